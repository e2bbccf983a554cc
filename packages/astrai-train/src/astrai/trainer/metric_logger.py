"""`MetricLoggerCallback`: one JSON line per logged optimizer step, appended to `log_dir/metrics.jsonl`.

Records are appended and flushed every `save_interval` records, so logging costs O(1) per step however
long the run (the original rewrote the whole history into each file). The last step of a run is always
logged, even off the `log_interval` grid (a run shorter than `log_interval`, or one stopped by a signal);
there the grad_mean / grad_std / grad_max / grad_min / grad_nan_num statistics, computed only on
`log_interval` steps, are null. A resumed run first drops the
records after the step it resumed from (written by the interrupted run after its last checkpoint),
so the log reads as one uninterrupted run.

Record: {"step", "epoch", "iter", "timestamp", <metric>: value, ...} with metrics from
`astrai.config.METRICS`: loss (the step's exact mean loss), lr, val_loss (latest validation, or null),
grad_norm (global L2 norm before clipping), grad_mean / grad_std / grad_max / grad_min over every
gradient element (after clipping) and grad_nan_num, tokens_per_sec (input tokens, all ranks); then the
strategy's own metrics of the step, whichever metrics are chosen (DPO: rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected; GRPO: reward, reward_std,
frac_reward_zero_std, clip_ratio/region_mean, kl), each a mean over the step's units on all ranks.

With `report_to` (`astrai.trainer.trackers`) each record also goes to TensorBoard / W&B / MLflow.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from astrai.config import METRICS
from astrai.trainer.callback import CallbackFactory, TrainCallback
from astrai.trainer.trackers import Tracker, check_trackers, loggable, open_tracker

if TYPE_CHECKING:
    from astrai.trainer.context import TrainContext

METRICS_FILE = "metrics.jsonl"
_GRAD_METRICS = ("grad_mean", "grad_std", "grad_max", "grad_min", "grad_nan_num")


def gradient_statistics(model: nn.Module) -> dict[str, float]:
    """Mean, std, max, min of all finite gradient elements and the count of NaN ones (over all shards)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sharded = any(isinstance(g, DTensor) for g in grads)
    sums = torch.zeros(4, dtype=torch.float64)  # finite count, sum, sum of squares, NaN count
    extremes = torch.tensor([-float("inf"), -float("inf")], dtype=torch.float64)  # max, -min
    for grad in grads:
        g = (grad.to_local() if isinstance(grad, DTensor) else grad).detach().double().flatten()
        finite = g[torch.isfinite(g)]
        sums += (
            torch.stack([torch.tensor(finite.numel()), finite.sum(), finite.square().sum(), torch.isnan(g).sum()])
            .cpu()
            .double()
        )
        if finite.numel():
            extremes = torch.maximum(extremes, torch.stack([finite.max(), -finite.min()]).cpu())
    if sharded:  # FSDP: each rank holds a shard of every gradient
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    n, total, squares, nans = sums.tolist()
    mean = total / n if n else 0.0
    return {
        "grad_mean": mean,
        "grad_std": max(squares / n - mean * mean, 0.0) ** 0.5 if n else 0.0,
        "grad_max": float(extremes[0]) if n else 0.0,
        "grad_min": -float(extremes[1]) if n else 0.0,
        "grad_nan_num": int(nans),
    }


def strategy_metrics(context: TrainContext) -> dict[str, float | None]:
    """The strategy's metrics of the last step: sums and counts all-reduced over ranks (every rank calls)."""
    metric_sums = getattr(getattr(context, "strategy", None), "metric_sums", None)
    sums = metric_sums() if metric_sums is not None else {}
    names = sorted(sums)
    if not names:
        return {}
    totals = torch.stack([sums[n] for n in names])  # (metrics, 2): sum, count
    if context.world_size > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    totals = totals.tolist()
    return {n: s / c if c else None for n, (s, c) in zip(names, totals)}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file; a line that is not JSON raises `ValueError` naming it."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON record: {exc}") from None
    return records


@CallbackFactory.register("metric_logger")
class MetricLoggerCallback(TrainCallback):
    """Append the chosen `metrics` every `log_interval` optimizer steps to `log_dir/metrics.jsonl`, and
    send each record to the trackers named in `report_to` (their libraries are checked here: a missing
    one is a `ValueError` before training)."""

    def __init__(
        self,
        log_dir: str,
        save_interval: int = 1,
        log_interval: int = 10,
        metrics: list[str] | None = None,
        report_to: list[str] | None = None,
        run_name: str | None = None,
    ) -> None:
        metrics = ["loss", "lr"] if metrics is None else list(metrics)
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"metrics={unknown}: unknown; allowed {list(METRICS)}")
        if save_interval < 1 or log_interval < 1:
            raise ValueError(f"save_interval={save_interval}, log_interval={log_interval}: must be >= 1")
        self.log_dir = Path(log_dir)
        self.save_interval = save_interval  # records between flushes to disk
        self.log_interval = log_interval
        self.metrics = metrics
        self.report_to = list(report_to or [])
        check_trackers(self.report_to)
        self.run_name = run_name
        self._trackers: list[Tracker] = []
        self._file: IO[str] | None = None
        self._unflushed = 0
        self._grad_stats: dict[str, float] = {}
        self._clock: tuple[float, int] = (0.0, 0)  # (time, tokens) at the last record
        self._logged_step = 0  # the step of the last record (or of the checkpoint resumed from)

    @property
    def path(self) -> Path:
        return self.log_dir / METRICS_FILE

    def on_train_begin(self, context: TrainContext) -> None:
        self._clock = (time.perf_counter(), context.tokens)
        self._logged_step = context.step
        if context.rank != 0:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _keep_records_up_to(self.path, context.step)
        self._file = open(self.path, "a", encoding="utf-8")
        if not self.report_to:
            return
        config = {**(context.run_config or {}), "train": context.config.to_dict()}
        for name in self.report_to:
            self._trackers.append(open_tracker(name, self.log_dir, self.run_name, config, context.step))

    def on_optimizer_step(self, context: TrainContext) -> None:
        # Runs on every rank: with FSDP the statistics are reduced over the gradient shards.
        if (context.step + 1) % self.log_interval == 0 and any(m in _GRAD_METRICS for m in self.metrics):
            self._grad_stats = gradient_statistics(context.model)

    def on_batch_end(self, context: TrainContext) -> None:
        # Mid-window micro-batches are skipped; the window's last one ends at a step boundary.
        if not context.in_step and context.step % self.log_interval == 0:
            self._record(context)

    def _record(self, context: TrainContext) -> None:
        now, tokens = time.perf_counter(), context.tokens
        rate = (tokens - self._clock[1]) * context.world_size / max(now - self._clock[0], 1e-9)
        self._clock = (now, tokens)
        self._logged_step = context.step
        extra = strategy_metrics(context)  # a collective: before rank 0 alone goes on
        if self._file is None:
            return
        values = {
            "loss": context.loss,
            "lr": context.lr,
            "val_loss": context.val_loss,
            "grad_norm": context.grad_norm,
            "tokens_per_sec": rate,
            **self._grad_stats,
        }
        self._grad_stats = {}  # computed for this step only
        record = {
            "step": context.step,
            "epoch": context.epoch,
            "iter": context.iteration,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        record.update({m: values.get(m) for m in self.metrics})
        record.update(extra)
        self._file.write(json.dumps(record) + "\n")
        numbers = loggable(record)
        for tracker in self._trackers:
            tracker.log(numbers, context.step)
        self._unflushed += 1
        if self._unflushed >= self.save_interval:
            self._flush()

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._unflushed = 0

    def on_train_end(self, context: TrainContext) -> None:
        failed = getattr(context, "error", None) is not None
        if not failed and context.step != self._logged_step:  # the last step, off the log_interval grid
            self._record(context)
        self._close(failed=failed)

    def on_error(self, context: TrainContext) -> None:
        # Training failed: the log ends with the last completed record (on_train_end then writes nothing).
        self._close(failed=True)

    def _close(self, failed: bool) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.close(failed=failed)


def _keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite `path` without the records after `step` (once per resumed run)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
