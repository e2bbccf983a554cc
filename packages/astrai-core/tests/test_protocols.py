import inspect

import pytest

from astrai.protocols import KVCacheView, OptimizerProtocol, SchedulerProtocol


class Optim:
    def __init__(self):
        self.param_groups = [{"lr": 0.1}]
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1

    def zero_grad(self, set_to_none=True):
        pass

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state_dict):
        self.steps = state_dict["steps"]


class Sched:
    def step(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        pass

    def get_last_lr(self):
        return [0.1]


class View:
    seq_lens = (3, 1)

    def write(self, layer_id, k, v):
        pass

    def gather(self, layer_id):
        return (), ()

    packed = False

    def attend(self, layer_id, q, k, v, scale):
        return None


def test_structural_matches():
    assert isinstance(Optim(), OptimizerProtocol)
    assert isinstance(Sched(), SchedulerProtocol)
    assert isinstance(View(), KVCacheView)


def test_structural_mismatches():
    assert not isinstance(Sched(), OptimizerProtocol)  # no zero_grad / param_groups
    assert not isinstance(Optim(), SchedulerProtocol)  # no get_last_lr
    assert not isinstance(Optim(), KVCacheView)


@pytest.mark.parametrize("protocol", [OptimizerProtocol, SchedulerProtocol])
def test_load_state_dict_takes_d_positionally(protocol):
    """Architecture document: `load_state_dict(d)`; positional-only, so torch's `state_dict` name matches too."""
    (_, d) = inspect.signature(protocol.load_state_dict).parameters.values()
    assert (d.name, d.kind) == ("d", inspect.Parameter.POSITIONAL_ONLY)
