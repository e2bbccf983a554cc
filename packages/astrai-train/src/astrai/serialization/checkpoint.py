"""`Checkpoint`: one training state on disk, written atomically, plus the `latest` pointer of a run.

Layout of a checkpoint folder:

    model.safetensors          weights with unwrapped names (no `module.` / FSDP prefixes); with LoRA,
                               `adapter_model.safetensors` + `adapter_config.json` hold the adapters only
    config.json                the model config, so `AutoModel.from_pretrained(folder)` rebuilds the model
    <key>.pt                   one file per `extra` entry (optimizer, scheduler, sampler, rng, ...), tensors
                               and plain values only: loaded with `torch.load(weights_only=True)`
    meta.json                  epoch, iteration, step, the files written with their SHA-256 (`sha256`),
                               and `meta` (the run's config)

`save` writes everything into a hidden temporary folder beside the target, fsyncs every file and the
folder, and renames it into place, so a process killed mid-save never leaves a half-written folder under
the final name. A full disk is reported as "no space left on device while writing FILE" (torch's own error
names neither). `mark_latest` then points the run's `latest` file at it (also by rename);
`latest_checkpoint` falls back to the highest complete `step_*` folder when the pointer is missing or
stale; `prune_checkpoints` keeps a run's newest N step folders.

`load` verifies every file against its recorded SHA-256 before reading it, so flipped bits are an error
naming the file, never a silently different resume. Checkpoints written before hashes were recorded (no
`sha256` in meta.json) still load, unverified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
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
_RESERVED_META = ("epoch", "iteration", "step", "saved_at", "files", "sha256")
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
            files = self._write_files(tmp, target)
            meta = {
                "epoch": self.epoch,
                "iteration": self.iteration,
                "step": self.step,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": files,
                "sha256": {name: _sha256(tmp / name) for name in files},
                **self.meta,
            }
            with _writing(target / META_FILE):
                _write_json(tmp / META_FILE, meta)
            _fsync(tmp)
            if target.exists():  # overwriting: move the old folder aside first (rename onto a full dir fails)
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / target.name)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            _fsync(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _write_files(self, folder: Path, target: Path) -> list[str]:
        """Write every file but meta.json into `folder` (fsynced); returns their names. `target` is the
        folder they will be renamed to, named in errors."""
        files = []
        weights_name = ADAPTER_WEIGHTS_FILE if self.adapter_config is not None else WEIGHTS_FILE
        with _writing(target / weights_name):
            save_file(_unaliased(self.state_dict), str(folder / weights_name))
            _fsync(folder / weights_name)
        files.append(weights_name)
        configs = [(ADAPTER_CONFIG_FILE, self.adapter_config), (MODEL_CONFIG_FILE, self.model_config)]
        for name, config in configs:
            if config is not None:
                with _writing(target / name):
                    _write_json(folder / name, config)
                files.append(name)
        for key, value in self.extra.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", key) or key == Path(META_FILE).stem:
                raise ValueError(f"Checkpoint.extra key {key!r} is not usable as a file name")
            name = f"{key}.pt"
            with _writing(target / name), open(folder / name, "wb") as f:
                torch.save(value, f)
                f.flush()
                os.fsync(f.fileno())
            files.append(name)
        return files

    @classmethod
    def load(cls, save_dir: str | Path) -> Checkpoint:
        """Read a checkpoint folder; a missing or corrupt file (one whose SHA-256 differs from the one in
        meta.json) raises `ValueError` naming it. A checkpoint without recorded hashes (written before they
        were) is read unverified."""
        folder = Path(save_dir)
        if not folder.is_dir():
            raise ValueError(f"checkpoint folder {folder} does not exist")
        meta = _read_json(folder / META_FILE)
        missing = [name for name in meta.get("files", []) if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"checkpoint {folder} is incomplete: missing {[str(folder / m) for m in missing]}")
        for name, digest in meta.pop("sha256", {}).items():
            if _sha256(folder / name) != digest:
                raise ValueError(
                    f"checkpoint file {folder / name} is corrupt: its SHA-256 differs from the one in {META_FILE}"
                )
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
    _fsync(folder.parent)


def step_checkpoints(root: str | Path) -> list[Path]:
    """The complete `step_*` checkpoint folders under `root`, oldest (lowest step) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / META_FILE).is_file()
    )
    return [path for _, path in steps]


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step folders under `root` (never the one `latest` points to);
    returns the deleted folders."""
    latest = latest_checkpoint(root)
    old = [path for path in step_checkpoints(root)[:-keep] if path != latest]
    for path in old:
        shutil.rmtree(path)
    return old


def clear_checkpoints(root: str | Path) -> None:
    """Delete every checkpoint of the run rooted at `root` (step folders, `latest`, half-written
    temporaries); other files there, such as a log folder, are kept."""
    root = Path(root)
    if not root.is_dir():
        return
    _remove_stale_temporaries(root)
    for path in root.iterdir():
        if _STEP_DIR.match(path.name) and path.is_dir():
            shutil.rmtree(path)
    (root / LATEST_FILE).unlink(missing_ok=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`: the `latest` pointer, else the highest `step_*`."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / META_FILE).is_file():
            return candidate
    steps = step_checkpoints(root)
    return steps[-1] if steps else None


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Re-raise a full disk while writing `path` as one error that says so. torch reports it as an
    `inline_container.cc` RuntimeError that carries no errno (writing to a path) or raised while Python's
    ENOSPC was handled (writing to a file object), safetensors as an IoError, Python as ENOSPC."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        if not _disk_full(exc, path.parent.parent):
            raise
        raise OSError(errno.ENOSPC, f"no space left on device while writing {path}") from exc


def _disk_full(exc: BaseException | None, folder: Path) -> bool:
    """Whether `exc` (or one it was raised from or while handling) is ENOSPC, or the write failed on a file
    system with no space left for this user."""
    if shutil.disk_usage(folder).free == 0:
        return True
    while exc is not None:
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Values that are not JSON (a callable in extra_kwargs, say) are recorded by type name, not dropped.
    text = json.dumps(data, indent=2, default=lambda o: f"<{type(o).__name__}>")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's entries: the names of files created or renamed in it)."""
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
