"""`astrai.parallel` re-exports astrai-train's executors lazily: no import edge, a clear error without astrai-train."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import astrai.parallel
from astrai.parallel import TRAINING_EXPORTS

# The architecture document's astrai.parallel names that astrai-train defines.
DOCUMENTED = [
    "BaseExecutor", "NoneExecutor", "DDPExecutor", "FSDPExecutor", "ExecutorFactory",
    "GradientState", "AccumOptimizer", "AccumScheduler",
]  # fmt: skip


def test_importing_astrai_parallel_does_not_import_astrai_train():
    code = "import sys, astrai.parallel; print(sorted(m for m in sys.modules if m.startswith('astrai.trainer')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert sorted(TRAINING_EXPORTS) == sorted(DOCUMENTED)
    assert set(DOCUMENTED) <= set(dir(astrai.parallel)) and not set(DOCUMENTED) & set(astrai.parallel.__all__)


def test_executors_resolve_to_astrai_train():
    executor = pytest.importorskip("astrai.trainer.executor")
    accumulation = pytest.importorskip("astrai.trainer.accumulation")
    from astrai.parallel import AccumOptimizer, DDPExecutor, ExecutorFactory, GradientState

    assert DDPExecutor is executor.DDPExecutor and ExecutorFactory is executor.ExecutorFactory
    assert GradientState is accumulation.GradientState and AccumOptimizer is accumulation.AccumOptimizer
    for name in DOCUMENTED:
        assert getattr(astrai.parallel, name) is getattr(sys.modules[TRAINING_EXPORTS[name]], name)
    assert isinstance(ExecutorFactory.create("none"), executor.NoneExecutor)


def _forget_cached(monkeypatch):
    for name in DOCUMENTED:  # attributes a previous lookup cached on the package
        if name in vars(astrai.parallel):  # not hasattr: without astrai-train that raises ImportError
            monkeypatch.delattr(astrai.parallel, name)


def test_without_astrai_train_the_error_names_the_distribution(monkeypatch):
    _forget_cached(monkeypatch)
    for module in ("astrai.trainer", "astrai.trainer.executor", "astrai.trainer.accumulation"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` now fails as if astrai-train were absent
    with pytest.raises(ImportError, match=r"astrai.parallel.DDPExecutor .* astrai-train distribution .*pip install"):
        from astrai.parallel import DDPExecutor  # noqa: F401
    with pytest.raises(ImportError, match="astrai-train") as info:
        astrai.parallel.GradientState  # noqa: B018
    assert info.value.name == "astrai.trainer.accumulation"


def test_a_missing_dependency_of_astrai_train_is_not_disguised(monkeypatch):
    _forget_cached(monkeypatch)

    def import_module(name):
        raise ModuleNotFoundError("No module named 'h5py'", name="h5py")

    monkeypatch.setattr("astrai.parallel.lazy.importlib", types.SimpleNamespace(import_module=import_module))
    with pytest.raises(ModuleNotFoundError, match="h5py"):
        astrai.parallel.BaseExecutor  # noqa: B018


def test_unknown_names_are_attribute_errors():
    assert not hasattr(astrai.parallel, "TensorParallelExecutor")
    with pytest.raises(AttributeError, match="module 'astrai.parallel' has no attribute 'Nope'"):
        astrai.parallel.Nope  # noqa: B018
