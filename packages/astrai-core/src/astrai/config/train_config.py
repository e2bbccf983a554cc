"""`TrainConfig` (one training run: live model/data/optimizer plus plain settings) and `LoRAConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from astrai.config.base import BaseConfig, live_field
from astrai.factory import known_names

METRICS = (
    "loss",
    "lr",
    "val_loss",
    "grad_norm",
    "grad_std",
    "grad_max",
    "grad_min",
    "grad_mean",
    "grad_nan_num",
    "tokens_per_sec",
)
# Experiment trackers `report_to` may name; astrai-train logs to each through its own library, installed
# with the astrai-train extra of the same name (`pip install 'astrai-train[tensorboard]'`).
TRACKERS = ("tensorboard", "wandb", "mlflow")
BUILTIN_STRATEGIES = ("seq", "sft", "dpo", "grpo")
BUILTIN_EXECUTORS = ("none", "ddp", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")
DEVICE_TYPES = ("auto", "cpu", "cuda")
START_METHODS = ("spawn", "fork", "forkserver")
MIXED_PRECISION = ("no", "bf16", "fp16")


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"TrainConfig.{field}={value!r}: {why}")


@dataclasses.dataclass
class LoRAConfig(BaseConfig):
    """Low-rank adapters: W x + (alpha / rank) * B A x on every linear layer named in `target_modules`."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])

    def validate(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank={self.rank!r}: must be positive")
        if self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha={self.alpha!r}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout={self.dropout!r}: must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules=[]: name at least one projection, e.g. 'q_proj'")


@dataclasses.dataclass
class TrainConfig(BaseConfig):
    """Everything one training run needs. Live objects (model, data, optimizer and scheduler builders) are
    not serialised; everything else is written to each checkpoint's `meta.json`."""

    model: Any = live_field(default=None)
    strategy: str | None = None
    dataset: Any = live_field(default=None)
    optimizer_fn: Callable[..., Any] | None = live_field(default=None)  # model -> optimizer
    scheduler_fn: Callable[..., Any] | None = live_field(default=None)  # optimizer -> scheduler (None: constant)

    n_epoch: int = 1
    batch_per_device: int = 4
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    gradient_checkpointing_modules: list[Any] = live_field(default_factory=list)  # module types to recompute
    start_epoch: int = 0
    start_batch: int = 0
    ckpt_dir: str = "./checkpoint"
    ckpt_interval: int = 5000  # optimizer steps between checkpoints; <= 0: only at the end
    keep_checkpoints: int | None = None  # newest step folders kept under ckpt_dir (plus latest); None: all
    log_dir: str = "./checkpoint/logs"
    log_interval: int = 100
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["loss", "lr"])
    # Trackers that get every metrics.jsonl record too (rank 0 only): names from TRACKERS; a single name
    # may be given as a string. "none" alone (or []) reports to none.
    report_to: list[str] = dataclasses.field(default_factory=list)
    run_name: str | None = None  # the run's name in the trackers (None: each tracker's default)
    lora: LoRAConfig | None = None
    random_seed: int = 3407
    num_workers: int = 0
    prefetch_factor: int | None = None
    pin_memory: bool = False
    nprocs: int = 1
    backend: str = "auto"  # auto: nccl with CUDA, gloo otherwise
    master_addr: str = "localhost"
    master_port: str | None = None  # None: a free port is found
    start_method: str = "spawn"
    device_type: str = "auto"  # auto: cuda when available, else cpu
    val_dataset: Any = live_field(default=None)
    val_step: int = 1000  # optimizer steps between validations; <= 0 disables
    parallel_mode: str = "none"
    mixed_precision: str = "no"
    compile: bool = False
    executor_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.master_port, int) and not isinstance(self.master_port, bool):
            self.master_port = str(self.master_port)
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        if self.report_to == ["none"]:
            self.report_to = []
        super().__post_init__()

    def validate(self) -> None:
        for name in ("model", "strategy", "dataset", "optimizer_fn"):
            if getattr(self, name) is None:
                _fail(name, None, "is required")
        for name in ("n_epoch", "batch_per_device", "grad_accum_steps", "nprocs", "log_interval"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        for name in ("start_epoch", "start_batch", "num_workers", "random_seed"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "must be >= 0")
        if self.keep_checkpoints is not None and (
            isinstance(self.keep_checkpoints, bool)
            or not isinstance(self.keep_checkpoints, int)
            or self.keep_checkpoints < 1
        ):
            _fail("keep_checkpoints", self.keep_checkpoints, "must be an int >= 1 (or None to keep every checkpoint)")
        if self.prefetch_factor is not None:
            if self.prefetch_factor < 1:
                _fail("prefetch_factor", self.prefetch_factor, "must be >= 1")
            if self.num_workers == 0:
                _fail("prefetch_factor", self.prefetch_factor, "needs num_workers > 0")
        if self.master_port is not None and not (self.master_port.isdigit() and 0 < int(self.master_port) < 65536):
            _fail("master_port", self.master_port, "must be a port number in 1..65535 (or None for a free one)")
        _check_choice("strategy", self.strategy, known_names("strategy", BUILTIN_STRATEGIES))
        _check_choice("parallel_mode", self.parallel_mode, known_names("executor", BUILTIN_EXECUTORS))
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("device_type", self.device_type, DEVICE_TYPES)
        _check_choice("start_method", self.start_method, START_METHODS)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        for metric in self.metrics:
            _check_choice("metrics", metric, METRICS)
        for tracker in self.report_to:
            _check_choice("report_to", tracker, TRACKERS)
        if len(set(self.report_to)) != len(self.report_to):
            _fail("report_to", self.report_to, "names a tracker twice")
        if self.run_name is not None and not self.run_name.strip():
            _fail("run_name", self.run_name, "must be a non-empty name (or None for each tracker's default)")
        for name in ("optimizer_fn", "scheduler_fn"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                _fail(name, fn, "must be callable")
        if self.nprocs > 1 and self.parallel_mode == "none":
            _fail("parallel_mode", self.parallel_mode, f"nprocs={self.nprocs} needs 'ddp' or 'fsdp'")


def _check_choice(field: str, value: Any, allowed: Any) -> None:
    if value not in allowed:
        _fail(field, value, f"allowed: {list(allowed)}")
