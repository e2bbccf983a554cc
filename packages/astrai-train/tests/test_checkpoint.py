"""Checkpoint folders: round trip, atomic replacement, the `latest` pointer, clear errors on damage
(flipped bits included), a full disk, retention, and a process killed while saving."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import astrai.serialization.checkpoint as checkpoint_module
from astrai.model import AutoModel
from astrai.serialization import (
    Checkpoint,
    checkpoint_dir,
    clear_checkpoints,
    get_rng_state,
    latest_checkpoint,
    mark_latest,
    prune_checkpoints,
    set_rng_state,
)


def _checkpoint(step: int = 3) -> Checkpoint:
    optimizer = {
        "state": {0: {"exp_avg": torch.arange(3.0)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}],
    }
    return Checkpoint(
        state_dict={"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)},
        epoch=1,
        iteration=7,
        step=step,
        extra={"optimizer": optimizer, "sampler": {"epoch": 1, "iter": 4}},
        meta={"train_config": {"n_epoch": 2, "optimizer_fn": print}},
        model_config={"dim": 4},
    )


def test_round_trip(tmp_path: Path) -> None:
    saved = _checkpoint()
    path = saved.save(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "meta.json",
        "model.safetensors",
        "optimizer.pt",
        "sampler.pt",
    ]
    loaded = Checkpoint.load(path)
    assert loaded.state_dict.keys() == saved.state_dict.keys()
    for name, tensor in saved.state_dict.items():
        assert torch.equal(loaded.state_dict[name], tensor) and loaded.state_dict[name].dtype == tensor.dtype
    assert (loaded.epoch, loaded.iteration, loaded.step) == (1, 7, 3)
    assert loaded.extra["sampler"] == {"epoch": 1, "iter": 4}
    assert torch.equal(loaded.extra["optimizer"]["state"][0]["exp_avg"], torch.arange(3.0))
    assert loaded.extra["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    # A value that is not JSON is recorded by type, not dropped and not a crash.
    assert loaded.meta == {"train_config": {"n_epoch": 2, "optimizer_fn": "<builtin_function_or_method>"}}
    assert loaded.model_config == {"dim": 4} and loaded.adapter_config is None


def test_tied_weights_are_saved_and_model_rebuilds_from_the_folder(tmp_path: Path, make_lm) -> None:
    model = make_lm(tie_weight=True)
    state = dict(model.state_dict())
    state["alias"] = state["embed_tokens.weight"]  # shared storage: safetensors refuses it unless copied
    Checkpoint(state, model_config=model.config.to_dict()).save(tmp_path / "c")
    del state["alias"]
    Checkpoint(state, model_config=model.config.to_dict()).save(tmp_path / "c")  # replaces the folder
    rebuilt = AutoModel.from_pretrained(tmp_path / "c")
    ids = torch.randint(0, 64, (1, 5))
    assert torch.equal(rebuilt(ids)["logits"], model(ids)["logits"])


def test_adapter_checkpoint_layout(tmp_path: Path) -> None:
    ckpt = Checkpoint({"q.lora_A": torch.ones(2, 3)}, adapter_config={"rank": 2, "alpha": 4.0})
    path = ckpt.save(tmp_path / "a")
    assert {p.name for p in path.iterdir()} == {"adapter_model.safetensors", "adapter_config.json", "meta.json"}
    loaded = Checkpoint.load(path)
    assert loaded.adapter_config == {"rank": 2, "alpha": 4.0}
    assert torch.equal(loaded.state_dict["q.lora_A"], torch.ones(2, 3))


def test_latest_pointer_and_fallback(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (1, 12, 5):
        _checkpoint(step).save(checkpoint_dir(tmp_path, step))
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000012"  # no pointer: highest step
    mark_latest(checkpoint_dir(tmp_path, 5))
    assert (tmp_path / "latest").read_text().strip() == "step_00000005"
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000005"
    (tmp_path / "latest").write_text("step_00000099\n")  # stale pointer: highest complete step
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000012"


def test_reserved_meta_and_bad_extra_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved key"):
        Checkpoint({}, meta={"step": 1}).save(tmp_path / "x")
    with pytest.raises(ValueError, match="not usable as a file name"):
        Checkpoint({}, extra={"../evil": 1}).save(tmp_path / "x")
    assert not any(tmp_path.iterdir())  # failed saves leave nothing behind


@pytest.mark.parametrize(
    "damage, file",
    [
        (lambda p: (p / "meta.json").write_text("{not json"), "meta.json"),
        (lambda p: (p / "meta.json").unlink(), "meta.json"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 5), "model.safetensors"),
        (lambda p: (p / "optimizer.pt").write_bytes(b"garbage"), "optimizer.pt"),
        (lambda p: (p / "sampler.pt").unlink(), "sampler.pt"),
        (lambda p: (p / "config.json").write_text("[1, 2]"), "config.json"),
    ],
)
def test_damaged_checkpoint_names_the_file(tmp_path: Path, damage, file: str) -> None:
    path = _checkpoint().save(tmp_path / "c")
    damage(path)
    with pytest.raises(ValueError, match=file.replace(".", r"\.")):
        Checkpoint.load(path)


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.pt", "config.json"])
def test_flipped_bits_are_an_error_naming_the_file(tmp_path: Path, file: str) -> None:
    path = _checkpoint().save(tmp_path / "c")
    data = bytearray((path / file).read_bytes())
    data[-3] ^= 0x01  # one bit of the payload: the file still parses, with a different value
    (path / file).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{file.replace('.', '[.]')} is corrupt: its SHA-256 differs"):
        Checkpoint.load(path)


def test_checkpoint_without_hashes_loads_unverified(tmp_path: Path) -> None:
    path = _checkpoint().save(tmp_path / "c")
    meta = json.loads((path / "meta.json").read_text())
    assert sorted(meta["sha256"]) == sorted(meta["files"])  # every file but meta.json is hashed
    del meta["sha256"]  # as written before hashes were recorded
    (path / "meta.json").write_text(json.dumps(meta))
    assert Checkpoint.load(path).step == 3


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


def _torch_error_during_enospc() -> RuntimeError:
    """torch.save into a Python file object on a full disk: its error, raised while handling ENOSPC."""
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        except RuntimeError as exc:
            return exc


def test_full_disk_names_the_file(tmp_path: Path, monkeypatch) -> None:
    target = checkpoint_dir(tmp_path, 4)
    monkeypatch.setattr(checkpoint_module.torch, "save", _raise(_torch_error_during_enospc()))
    with pytest.raises(OSError, match=rf"no space left on device while writing {target}/optimizer[.]pt"):
        _checkpoint().save(target)
    assert not any(tmp_path.iterdir())  # nothing half-written is left
    # The same torch error with no errno underneath (torch writing to a path), on a file system that has
    # no space left; and safetensors' own error.
    plain = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(checkpoint_module.torch, "save", _raise(plain))
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda p: SimpleNamespace(free=0))
    with pytest.raises(OSError, match=rf"no space left on device while writing {target}/optimizer[.]pt"):
        _checkpoint().save(target)
    monkeypatch.undo()
    storage_full = checkpoint_module.SafetensorError('IoError(Os { code: 28, message: "No space left on device" })')
    monkeypatch.setattr(checkpoint_module, "save_file", _raise(storage_full))
    with pytest.raises(OSError, match=rf"no space left on device while writing {target}/model[.]safetensors"):
        _checkpoint().save(target)
    # Any other write error stays what it was.
    monkeypatch.setattr(checkpoint_module, "save_file", _raise(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="^boom$"):
        _checkpoint().save(target)


def test_prune_keeps_the_newest_and_latest_and_clear_keeps_other_files(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        mark_latest(Checkpoint({"w": torch.zeros(1)}, step=step).save(checkpoint_dir(tmp_path, step)))
    mark_latest(checkpoint_dir(tmp_path, 2))  # a pointer that is not the newest is never deleted
    assert prune_checkpoints(tmp_path, 1) == [checkpoint_dir(tmp_path, 1), checkpoint_dir(tmp_path, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    (tmp_path / "logs").mkdir()
    clear_checkpoints(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["logs"] and latest_checkpoint(tmp_path) is None


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Checkpoint.load(tmp_path / "nowhere")


def test_rng_state_round_trip(tmp_path: Path) -> None:
    Checkpoint({}, extra={"rng": get_rng_state()}).save(tmp_path / "r")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(Checkpoint.load(tmp_path / "r").extra["rng"])  # loaded with weights_only=True
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


_KILLED_WRITER = """
import sys
import torch
import astrai.serialization.checkpoint as module
from astrai.serialization import Checkpoint, checkpoint_dir, mark_latest

root = sys.argv[1]
real_save = module.save_file
def stalled_save(tensors, filename):
    real_save(tensors, filename)
    with open(filename, "r+b") as f:  # half the file is on disk when the process dies
        f.truncate(8)
    print("WRITING", flush=True)
    sys.stdin.readline()  # blocks until the test kills this process

mark_latest(Checkpoint({"w": torch.zeros(2)}, step=1).save(checkpoint_dir(root, 1)))
module.save_file = stalled_save
Checkpoint({"w": torch.ones(2)}, step=2).save(checkpoint_dir(root, 2))
"""


def test_sigkill_while_saving_keeps_previous_latest(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_KILLED_WRITER))
    root = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING"
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert leftovers and not (root / "step_00000002").exists()
    latest = latest_checkpoint(root)
    assert latest == root / "step_00000001"
    assert torch.equal(Checkpoint.load(latest).state_dict["w"], torch.zeros(2))
    # The next save clears the half-written folder.
    Checkpoint({"w": torch.ones(2)}, step=2).save(checkpoint_dir(root, 2))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert json.loads((root / "step_00000002" / "meta.json").read_text())["step"] == 2
