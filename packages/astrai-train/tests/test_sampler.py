"""ResumableDistributedSampler: torch's DistributedSampler order, sharding, and exact resume."""

import itertools

import pytest
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from astrai.dataset import ResumableDistributedSampler


@pytest.mark.parametrize(
    ("n", "replicas", "shuffle", "drop_last"),
    [(10, 3, True, False), (10, 3, True, True), (11, 2, False, False), (2, 5, True, False)],
)
def test_order_matches_torch_distributed_sampler(n, replicas, shuffle, drop_last):
    data = range(n)
    for rank, epoch in itertools.product(range(replicas), range(3)):
        ours = ResumableDistributedSampler(
            data, start_epoch=epoch, seed=7, drop_last=drop_last, shuffle=shuffle, rank=rank, num_replicas=replicas
        )
        reference = DistributedSampler(
            data, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=7, drop_last=drop_last
        )
        reference.set_epoch(epoch)
        assert list(ours) == list(reference)


def test_two_ranks_partition_the_data():
    shards = [list(ResumableDistributedSampler(range(12), rank=r, num_replicas=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert sorted(shards[0] + shards[1]) == list(range(12))


def test_resume_mid_epoch_yields_exactly_the_rest():
    sampler = ResumableDistributedSampler(range(20), seed=3, rank=1, num_replicas=2)
    full = list(ResumableDistributedSampler(range(20), seed=3, rank=1, num_replicas=2))
    it = iter(sampler)
    head = [next(it) for _ in range(4)]
    assert len(sampler) == 6
    state = sampler.state_dict()
    resumed = ResumableDistributedSampler(range(20), seed=3, rank=1, num_replicas=2)
    resumed.load_state_dict(state)
    assert len(resumed) == 6
    assert head + list(resumed) == full


def test_resume_across_an_epoch_boundary():
    def make():
        return ResumableDistributedSampler(range(7), seed=5)

    epoch0, epoch1 = list(make()), list(ResumableDistributedSampler(range(7), start_epoch=1, seed=5))
    assert epoch0 != epoch1  # reshuffled per epoch
    sampler = make()
    it = iter(sampler)
    consumed = [next(it) for _ in range(7)]  # the whole epoch: the state already points at the next one
    assert consumed == epoch0 and (sampler.epoch, sampler.iter) == (1, 0)
    it = iter(sampler)
    consumed += [next(it) for _ in range(2)]
    resumed = make()
    resumed.load_state_dict(sampler.state_dict())
    assert (resumed.epoch, resumed.iter, len(resumed)) == (1, 2, 5)
    assert consumed + list(resumed) == epoch0 + epoch1


def test_start_iter_counts_consumed_samples_across_epochs():
    sampler = ResumableDistributedSampler(range(10), start_epoch=2, start_iter=13, rank=0, num_replicas=2)
    assert (sampler.epoch, sampler.iter, len(sampler)) == (4, 3, 2)
    assert list(sampler) == list(ResumableDistributedSampler(range(10), start_epoch=4, rank=0, num_replicas=2))[3:]


def test_set_epoch_keeps_a_resumed_position_but_restarts_other_epochs():
    sampler = ResumableDistributedSampler(range(10), start_iter=4)
    sampler.set_epoch(0)
    assert len(sampler) == 6
    sampler.set_epoch(1)
    assert (sampler.epoch, len(sampler)) == (1, 10)


def test_load_state_dict_refuses_a_different_layout():
    state = ResumableDistributedSampler(range(10), rank=0, num_replicas=2).state_dict()
    with pytest.raises(ValueError, match=r"num_replicas.*\(2, 4\)"):
        ResumableDistributedSampler(range(10), rank=0, num_replicas=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"dataset_size.*\(10, 12\)"):
        ResumableDistributedSampler(range(12), rank=0, num_replicas=2).load_state_dict(state)
    with pytest.raises(ValueError, match="rank=2, num_replicas=2"):
        ResumableDistributedSampler(range(10), rank=2, num_replicas=2)


def test_replicas_come_from_the_default_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        sampler = ResumableDistributedSampler(range(5), shuffle=False)
        assert (sampler.rank, sampler.num_replicas) == (0, 1)
        assert list(sampler) == [0, 1, 2, 3, 4]
        grouped = ResumableDistributedSampler(range(5), process_group=dist.group.WORLD)
        assert grouped.num_replicas == 1
    finally:
        dist.destroy_process_group()
