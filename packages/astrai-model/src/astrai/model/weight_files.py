"""Reading and writing a folder's weights as safetensors: one `model.safetensors`, or shards listed by
`model.safetensors.index.json` (the layout transformers writes, `{"metadata": ..., "weight_map": {name: file}}`).

A model folder may come from anywhere, so its index is not trusted: a shard must be a file inside the folder
(`../x` or an absolute path is refused, as is a link leading out of it). `resolve_device` turns a device the
machine does not have (`cuda` on a CPU-only torch) into a `ValueError` that says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weights_source(folder: Path) -> Path:
    """The file that names a folder's weights: `model.safetensors`, else the shard index; ValueError if neither."""
    for name in (SINGLE_FILE, INDEX_FILE):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`device` (default CPU) as a `torch.device`; ValueError for a name torch does not know or a GPU not here."""
    try:
        resolved = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps): {exc}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(
                f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, {build})"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    return resolved


def _shard_path(folder: Path, source: Path, shard: object) -> Path:
    """The path of one shard named by the index, which must be a file inside `folder`."""
    if not isinstance(shard, str) or not shard:
        raise ValueError(f"{source}: shard names must be non-empty strings, got {shard!r}")
    path = (folder / shard).resolve()
    if Path(shard).is_absolute() or not path.is_relative_to(folder.resolve()):
        raise ValueError(f"{source}: shard {shard!r} is outside the model folder; shards must be files inside it")
    return path


def load_weight_files(folder: Path, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Every tensor of the folder's safetensors weights, loaded onto `device` (default CPU)."""
    source = weights_source(folder)
    device = str(resolve_device(device))
    if source.name == SINGLE_FILE:
        return _read(source, device, names=None)
    try:
        weight_map = json.loads(source.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{source}: not a valid safetensors index ({exc!r})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{source}: weight_map must map tensor names to shard files")
    by_shard: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(_shard_path(folder, source, shard), []).append(name)
    tensors: dict[str, Tensor] = {}
    for shard, names in sorted(by_shard.items()):
        if not shard.is_file():
            raise ValueError(f"{source}: shard {shard.name} (holding {names[:3]}...) does not exist")
        tensors.update(_read(shard, device, names))
    return tensors


def _read(path: Path, device: str, names: list[str] | None) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt", device=device) as f:
        present = set(f.keys())
        missing = sorted(set(names or ()) - present)
        if missing:
            raise ValueError(f"{path}: tensors {missing} listed in the index are not in this shard")
        return {name: f.get_tensor(name) for name in (names if names is not None else sorted(present))}


def save_weight_files(tensors: dict[str, Tensor], folder: Path, max_shard_bytes: int | None = None) -> None:
    """Write `tensors` as one `model.safetensors`, or as shards plus an index when above `max_shard_bytes`."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
