"""The loss curve of a run, drawn from its metrics log (`metrics.jsonl`) to a PNG with matplotlib (Agg)."""

from __future__ import annotations

from pathlib import Path

from astrai.trainer.metric_logger import METRICS_FILE, read_metrics

PLOT_FILE = "loss.png"


def find_metrics(run_dir: str | Path) -> Path:
    """The metrics log of a run: `run_dir` itself, `run_dir/metrics.jsonl`, or one found below it."""
    path = Path(run_dir)
    if path.is_file():
        return path
    if (path / METRICS_FILE).is_file():
        return path / METRICS_FILE
    found = sorted(path.rglob(METRICS_FILE)) if path.is_dir() else []
    if not found:
        raise ValueError(f"no {METRICS_FILE} in {path}")
    return found[0]


def plot_loss(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw training (and validation) loss against optimizer steps; returns the PNG's path
    (default: `loss.png` beside the metrics log)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = find_metrics(run_dir)
    records = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train:
        raise ValueError(f"{metrics} has no loss records (is 'loss' in TrainConfig.metrics?)")
    # A Figure with its own Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out is not None else metrics.with_name(PLOT_FILE)
    fig.savefig(out, dpi=120)
    return out
