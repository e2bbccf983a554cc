"""`Checkpoint`: one training state on disk, written atomically, plus the `latest` pointer of a run.

Layout of a checkpoint folder:

    model.safetensors          weights with unwrapped names (no `module.` / FSDP prefixes); with LoRA,
                               `adapter_model.safetensors` + `adapter_config.json` hold the adapters only
    config.json                the model config, so `AutoModel.from_pretrained(folder)` rebuilds the model
    <key>.pt                   one file per `extra` entry (optimizer, scheduler, sampler, rng, ...), tensors
                               and plain values only: loaded with `torch.load(weights_only=True)`
    meta.json                  epoch, iteration, step, the files written, and `meta` (the run's config)

`save` writes everything into a hidden temporary folder beside the target and renames it into place, so a
process killed mid-save never leaves a half-written folder under the final name. `mark_latest` then
points the run's `latest` file at it (also by rename); `latest_checkpoint` falls back to the highest
complete `step_*` folder when the pointer is missing or stale.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "model.safetensors"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MODEL_CONFIG_FILE = "config.json"
META_FILE = "meta.json"
LATEST_FILE = "latest"
_RESERVED_META = ("epoch", "iteration", "step", "saved_at", "files")
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclasses.dataclass
class Checkpoint:
    """A model's weights plus everything needed to continue training exactly where it stopped."""

    state_dict: dict[str, torch.Tensor]
    epoch: int = 0
    iteration: int = 0  # micro-batches consumed since the start of training
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    step: int = 0  # optimizer steps taken
    model_config: dict[str, Any] | None = None  # written as config.json
    adapter_config: dict[str, Any] | None = None  # set: state_dict holds LoRA adapters only

    def save(self, save_dir: str | Path) -> Path:
        """Write the checkpoint to `save_dir` (replacing it if present) through an atomic rename."""
        reserved = sorted(set(self.meta) & set(_RESERVED_META))
        if reserved:
            raise ValueError(f"Checkpoint.meta uses reserved key(s) {reserved}")
        target = Path(save_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            files = self._write_files(tmp)
            meta = {
                "epoch": self.epoch,
                "iteration": self.iteration,
                "step": self.step,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": files,
                **self.meta,
            }
            _write_json(tmp / META_FILE, meta)
            _fsync_dir(tmp)
            if target.exists():  # overwriting: move the old folder aside first (rename onto a full dir fails)
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / target.name)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _write_files(self, folder: Path) -> list[str]:
        files = []
        weights_name = ADAPTER_WEIGHTS_FILE if self.adapter_config is not None else WEIGHTS_FILE
        save_file(_unaliased(self.state_dict), str(folder / weights_name))
        files.append(weights_name)
        if self.adapter_config is not None:
            _write_json(folder / ADAPTER_CONFIG_FILE, self.adapter_config)
            files.append(ADAPTER_CONFIG_FILE)
        if self.model_config is not None:
            _write_json(folder / MODEL_CONFIG_FILE, self.model_config)
            files.append(MODEL_CONFIG_FILE)
        for key, value in self.extra.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", key) or key == Path(META_FILE).stem:
                raise ValueError(f"Checkpoint.extra key {key!r} is not usable as a file name")
            name = f"{key}.pt"
            with open(folder / name, "wb") as f:
                torch.save(value, f)
                f.flush()
                os.fsync(f.fileno())
            files.append(name)
        return files

    @classmethod
    def load(cls, save_dir: str | Path) -> Checkpoint:
        """Read a checkpoint folder; a missing or corrupt file raises `ValueError` naming it."""
        folder = Path(save_dir)
        if not folder.is_dir():
            raise ValueError(f"checkpoint folder {folder} does not exist")
        meta = _read_json(folder / META_FILE)
        missing = [name for name in meta.get("files", []) if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"checkpoint {folder} is incomplete: missing {[str(folder / m) for m in missing]}")
        files = meta.pop("files", [])
        adapter = ADAPTER_WEIGHTS_FILE in files
        weights_path = folder / (ADAPTER_WEIGHTS_FILE if adapter else WEIGHTS_FILE)
        try:
            state_dict = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"cannot read weights {weights_path}: {exc}") from None
        extra = {}
        for name in files:
            if name.endswith(".pt"):
                extra[name[:-3]] = _load_tensor_file(folder / name)
        return cls(
            state_dict=state_dict,
            epoch=meta.pop("epoch", 0),
            iteration=meta.pop("iteration", 0),
            step=meta.pop("step", 0),
            extra=extra,
            model_config=_read_json(folder / MODEL_CONFIG_FILE) if MODEL_CONFIG_FILE in files else None,
            adapter_config=_read_json(folder / ADAPTER_CONFIG_FILE) if adapter else None,
            meta={k: v for k, v in meta.items() if k != "saved_at"},
        )


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """Where a run rooted at `root` keeps the checkpoint of optimizer step `step`."""
    return Path(root) / f"step_{step:08d}"


def mark_latest(save_dir: str | Path) -> None:
    """Point `<parent>/latest` at `save_dir` (atomically: a crash leaves the previous pointer)."""
    folder = Path(save_dir)
    pointer = folder.parent / LATEST_FILE
    tmp = pointer.with_name(f".{LATEST_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(folder.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, pointer)
    _fsync_dir(folder.parent)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`: the `latest` pointer, else the highest `step_*`."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / META_FILE).is_file():
            return candidate
    if not root.is_dir():
        return None
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / META_FILE).is_file()
    )
    return steps[-1][1] if steps else None


def _unaliased(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (safetensors refuses aliases, e.g. tied weights)."""
    out, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen and tensor.numel() else tensor
        seen.add(key)
    return out


def _load_tensor_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise ValueError(f"cannot read checkpoint file {path}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint file {path} must hold a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Values that are not JSON (a callable in extra_kwargs, say) are recorded by type name, not dropped.
    text = json.dumps(data, indent=2, default=lambda o: f"<{type(o).__name__}>")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(parent: Path) -> None:
    """Delete half-written folders left by a process killed while saving."""
    for path in parent.glob(".*.tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    for path in parent.glob(".*.old-*"):
        shutil.rmtree(path, ignore_errors=True)
