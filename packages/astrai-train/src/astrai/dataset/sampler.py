"""`ResumableDistributedSampler`: a DistributedSampler that can stop mid-epoch and resume exactly.

Order per epoch is that of `torch.utils.data.DistributedSampler`: a permutation seeded with `seed + epoch`
(or `0..n-1` without shuffling), padded by repeating its head up to a multiple of the number of replicas
(or cut down to one with `drop_last`), then rank `r` takes every `num_replicas`-th index from `r`.

The sampler counts what it has handed out: `iter` is the number of indices this rank has yielded in
`epoch`. When the last index of an epoch is yielded, `epoch` advances and `iter` returns to 0, so a
state saved at any point, across an epoch boundary included, resumes with exactly the indices not yet
yielded. Note that a DataLoader draws indices ahead of the batches it returns (one batch without
workers, `prefetch_factor * num_workers` batches with them); a trainer that saves mid-epoch should
save the count of samples it consumed, e.g. through `start_iter`, rather than rely on the live count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Deterministic, rank-sharded, resumable sampling of `range(len(data_source))`.

    `start_iter` counts the samples this rank already consumed from `start_epoch` on; it may exceed an
    epoch, in which case the sampler starts in the matching later epoch. The replica set comes from
    `rank` / `num_replicas` when given, else from `process_group` (or the default group when
    initialised), else a single replica.
    """

    def __init__(
        self,
        data_source: Sized,
        start_epoch: int = 0,
        start_iter: int = 0,
        seed: int = 42,
        drop_last: bool = False,
        shuffle: bool = True,
        process_group: dist.ProcessGroup | None = None,
        rank: int | None = None,
        num_replicas: int | None = None,
    ) -> None:
        distributed = process_group is not None or (dist.is_available() and dist.is_initialized())
        if num_replicas is None:
            num_replicas = dist.get_world_size(process_group) if distributed else 1
        if rank is None:
            rank = dist.get_rank(process_group) if distributed else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank}, num_replicas={num_replicas}: need 0 <= rank < num_replicas")
        if start_epoch < 0 or start_iter < 0:
            raise ValueError(f"start_epoch={start_epoch}, start_iter={start_iter}: must be >= 0")
        self.data_source = data_source
        self.rank, self.num_replicas = rank, num_replicas
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle
        n = len(data_source)
        self.num_samples = n // num_replicas if drop_last else math.ceil(n / num_replicas)  # per replica
        self.total_size = self.num_samples * num_replicas
        self.epoch, self.iter = start_epoch, 0
        if start_iter and self.num_samples == 0:
            raise ValueError(f"start_iter={start_iter}: the data source yields no samples for this rank")
        if start_iter:
            skipped_epochs, self.iter = divmod(start_iter, self.num_samples)
            self.epoch += skipped_epochs

    def _indices(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in order."""
        n = len(self.data_source)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        padding = self.total_size - n
        if padding > 0:
            order += (order * math.ceil(padding / n))[:padding]
        else:
            order = order[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices(self.epoch)
        for index in indices[self.iter :]:
            self.iter += 1
            if self.iter == self.num_samples:  # epoch done: a state saved now resumes at the next one
                self.epoch, self.iter = self.epoch + 1, 0
            yield index

    def __len__(self) -> int:
        """Indices this rank still yields in the current epoch."""
        return self.num_samples - self.iter

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` from its start; the current epoch keeps its position (so resuming is not undone)."""
        if epoch != self.epoch:
            self.epoch, self.iter = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "iter": self.iter,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "dataset_size": len(self.data_source),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved position; the data and the replica layout must be those it was saved with."""
        layout = {
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
            "dataset_size": len(self.data_source),
        }
        changed = {k: (state_dict[k], v) for k, v in layout.items() if state_dict[k] != v}
        if changed:
            raise ValueError(f"cannot resume exactly: saved vs current {changed}")
        if not 0 <= state_dict["iter"] < max(self.num_samples, 1):
            raise ValueError(f"iter={state_dict['iter']}: must be in [0, {self.num_samples})")
        self.seed, self.epoch, self.iter = state_dict["seed"], state_dict["epoch"], state_dict["iter"]
