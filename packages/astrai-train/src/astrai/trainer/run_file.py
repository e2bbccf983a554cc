"""Run files: a training run described by plain values (YAML or JSON), turned into a `TrainConfig`.

    seed: 42                         # torch seed before the model is built (default: train.random_seed)
    model:                           # exactly one of:
      config: {vocab_size: 256, dim: 64, n_layers: 2, n_heads: 4, dim_ffn: 128, max_len: 256}
      pretrained: models/base        # a folder AutoModel.from_pretrained reads (ours or Hugging Face)
    tokenizer: models/base           # optional: AutoTokenizer folder, to tokenise text data
    data:
      path: data/train               # a store DatasetFactory.load reads (mmap folder, .h5, .jsonl)
      window_size: 128
      stride: 128                    # optional (default window_size)
      storage_type: mmap             # optional (default: detected)
      val_path: data/val             # optional validation data (same type and window)
      train_type: seq                # optional: dataset type (default: train.strategy)
    optimizer: {name: adamw, lr: 3e-4, weight_decay: 0.1}   # adamw | sgd | muon, with their parameters
    schedule: {type: cosine, warmup_steps: 10, lr_decay_steps: 90}   # optional
    train: {strategy: seq, n_epoch: 1, batch_per_device: 8, ...}     # any plain TrainConfig field
    output: models/pretrained        # optional: after training, the final model (LoRA merged) and the
                                     # tokenizer are written here, ready for `astrai serve --model`

Relative paths are relative to the run file's folder. Every mistake raises `ValueError` naming the key.
The whole file (these plain values) is stored with each checkpoint, so a run can be reproduced from its
checkpoint folder alone.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from astrai.config import ConfigFactory, TrainConfig
from astrai.dataset import DatasetFactory
from astrai.model import AutoModel
from astrai.trainer.optimizer_fn import OptimizerFn, SchedulerFn
from astrai.trainer.strategy import StrategyFactory

RUN_KEYS = ("seed", "model", "tokenizer", "data", "optimizer", "schedule", "train", "output")
MODEL_KEYS = ("config", "pretrained")
DATA_KEYS = ("path", "window_size", "stride", "storage_type", "val_path", "train_type")
PATH_FIELDS = ("ckpt_dir", "log_dir")
_LIVE_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(TrainConfig)
    if not f.metadata.get("serialize", True)
    and f.name != "gradient_checkpointing_modules"  # plain class names are fine here
)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string; accept exponent floats without a dot as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_run_file(path: str | Path) -> dict[str, Any]:
    """The plain values of a YAML or JSON run file (JSON is YAML)."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except FileNotFoundError:
        raise ValueError(f"run file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"run file {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"run file {path} must hold a mapping of sections {list(RUN_KEYS)}")
    return data


def _section(run: dict[str, Any], key: str, allowed: tuple[str, ...] | None, required: bool) -> dict[str, Any]:
    value = run.get(key)
    if value is None:
        if required:
            raise ValueError(f"{key}: missing (required section)")
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key}: must be a mapping, got {value!r}")
    if allowed is not None:
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"{key}.{unknown[0]}: unknown key; allowed {list(allowed)}")
    return value


def run_path(base_dir: Path, value: Any, key: str) -> Path:
    """`value` of run-file key `key` as a path; relative paths are relative to the run file's folder."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: must be a path string, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def build_model(section: dict[str, Any], base_dir: Path) -> torch.nn.Module:
    """A new model from `config` (a model config dict), or `pretrained` weights from a folder."""
    if ("config" in section) == ("pretrained" in section):
        raise ValueError("model: give exactly one of model.config (a new model) or model.pretrained (a folder)")
    if "pretrained" in section:
        return AutoModel.from_pretrained(run_path(base_dir, section["pretrained"], "model.pretrained"))
    if not isinstance(section["config"], dict):
        raise ValueError(f"model.config: must be a mapping of model config fields, got {section['config']!r}")
    try:
        config = ConfigFactory.load(section["config"])
    except ValueError as exc:
        raise ValueError(f"model.config: {exc}") from None
    return AutoModel.from_config(config)


def build_train_config(run: dict[str, Any], base_dir: str | Path) -> TrainConfig:
    """The `TrainConfig` a run file describes (its model built, its data loaded)."""
    base_dir = Path(base_dir)
    unknown = sorted(set(run) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown section; allowed {list(RUN_KEYS)}")
    if run.get("output") is not None:
        run_path(base_dir, run["output"], "output")  # a bad value fails now, not after training
    train = dict(_section(run, "train", None, required=True))
    misplaced = sorted(set(train) & set(_LIVE_FIELDS))
    if misplaced:
        raise ValueError(f"train.{misplaced[0]}: set by the model/data/optimizer/schedule sections, not here")
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(train) - set(fields))
    if unknown:
        raise ValueError(f"train.{unknown[0]}: unknown TrainConfig field; known {fields}")
    strategy = train.get("strategy")
    if strategy is None or not StrategyFactory.is_registered(strategy):  # checked before any data is read
        known = StrategyFactory.list_registered()
        raise ValueError(f"train.strategy={strategy!r}: unknown strategy; known {known}")
    for key in PATH_FIELDS:
        if key in train:
            train[key] = str(run_path(base_dir, train[key], f"train.{key}"))

    seed = run.get("seed", train.get("random_seed", 3407))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be an int >= 0, got {seed!r}")
    torch.manual_seed(seed)
    model = build_model(_section(run, "model", MODEL_KEYS, required=True), base_dir)

    tokenizer = None
    if run.get("tokenizer") is not None:
        from astrai.tokenize import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run_path(base_dir, run["tokenizer"], "tokenizer"))
    data = _section(run, "data", DATA_KEYS, required=True)
    for key in ("path", "window_size"):
        if key not in data:
            raise ValueError(f"data.{key}: missing")
    train_type = data.get("train_type", train.get("strategy"))

    def load(key: str) -> Any:
        return DatasetFactory.load(
            train_type,
            run_path(base_dir, data[key], f"data.{key}"),
            data["window_size"],
            data.get("stride"),
            data.get("storage_type"),
            tokenizer,
        )

    dataset = load("path")
    val_dataset = load("val_path") if data.get("val_path") is not None else None

    optimizer = dict(_section(run, "optimizer", None, required=True))
    schedule = dict(_section(run, "schedule", None, required=False))
    try:
        optimizer_fn = OptimizerFn(optimizer.pop("name", "adamw"), **optimizer)
    except ValueError as exc:
        raise ValueError(f"optimizer: {exc}") from None
    scheduler_fn = None
    if schedule:
        if "type" not in schedule:
            raise ValueError("schedule.type: missing (e.g. cosine, sgdr, wsd)")
        try:
            scheduler_fn = SchedulerFn(schedule.pop("type"), **schedule)
        except ValueError as exc:
            raise ValueError(f"schedule: {exc}") from None
    try:
        return TrainConfig(
            model=model,
            dataset=dataset,
            val_dataset=val_dataset,
            optimizer_fn=optimizer_fn,
            scheduler_fn=scheduler_fn,
            **train,
        )
    except ValueError as exc:
        raise ValueError(f"train: {exc}") from None
