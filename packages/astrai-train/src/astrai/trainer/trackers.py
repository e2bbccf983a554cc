"""Experiment trackers (`TrainConfig.report_to`): every metrics.jsonl record also goes to TensorBoard,
Weights & Biases or MLflow, written by each one's own library. The libraries are optional extras of
astrai-train (`pip install 'astrai-train[tensorboard]'`, `[wandb]`, `[mlflow]`, or `[trackers]` for all
three); a run naming a tracker whose library is missing fails before training, naming the extra.

    tensorboard  torch.utils.tensorboard.SummaryWriter: event files in `log_dir/tensorboard`
                 (`tensorboard --logdir LOG_DIR`); a resumed run purges the steps after its checkpoint,
                 as metrics.jsonl drops them
    wandb        wandb.init(project=$WANDB_PROJECT or "astrai", name=run_name, config=the run's plain
                 values), its files under `log_dir/wandb` unless $WANDB_DIR says otherwise; every other
                 setting from wandb's own environment variables (WANDB_MODE=offline: no network,
                 `wandb sync` uploads later)
    mlflow       a run in experiment $MLFLOW_EXPERIMENT_NAME or "astrai" of the tracking server
                 $MLFLOW_TRACKING_URI, or without one of a local SQLite store `log_dir/mlflow.db`
                 (`mlflow ui --backend-store-uri sqlite:///LOG_DIR/mlflow.db`); the run's plain values
                 become its params

Each record's numbers are logged at its optimizer step under the record's own names (loss, lr, val_loss,
grad_norm, tokens_per_sec, the strategy's rewards/... and so on); `step`, `iter`, `timestamp` and null
values are not. Only rank 0 reports.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from astrai.config.train_config import TRACKERS

NOT_LOGGED = ("step", "iter", "timestamp")
_MLFLOW_MAX_PARAM = 500  # the shortest param value length MLflow servers accept


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...
    def close(self, failed: bool = False) -> None: ...


def _libraries(name: str) -> tuple[str, ...]:
    """The modules tracker `name` needs here (MLflow's local SQLite store needs SQLAlchemy and Alembic)."""
    if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        return ("mlflow", "sqlalchemy", "alembic")
    return (name,)


def check_trackers(names: list[str]) -> None:
    """Raise `ValueError` for an unknown tracker name, or one whose library is not installed (naming the
    astrai-train extra that installs it)."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to={name!r}: unknown tracker; allowed {list(TRACKERS)}")
        for module in _libraries(name):
            try:
                importlib.import_module(module)
            except ImportError:
                raise ValueError(
                    f"report_to={name!r} needs the {module} library, which is not installed: "
                    f"pip install 'astrai-train[{name}]'"
                ) from None


def loggable(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record that trackers get."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in NOT_LOGGED and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def open_tracker(
    name: str, log_dir: Path, run_name: str | None, config: dict[str, Any], start_step: int = 0
) -> Tracker:
    """A started tracker `name` logging under `log_dir`; `start_step` is the step a resumed run starts at."""
    if name == "tensorboard":
        return TensorBoardTracker(log_dir, run_name, config, start_step)
    if name == "wandb":
        return WandbTracker(log_dir, run_name, config)
    if name == "mlflow":
        return MlflowTracker(log_dir, run_name, config)
    raise ValueError(f"report_to={name!r}: unknown tracker; allowed {list(TRACKERS)}")


class TensorBoardTracker:
    def __init__(self, log_dir: Path, run_name: str | None, config: dict[str, Any], start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(log_dir) / "tensorboard"
        # Events of an interrupted run after the checkpoint we resume from are dropped by TensorBoard.
        self.writer = SummaryWriter(str(self.path), purge_step=start_step + 1 if start_step else None)
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", f"```\n{text}\n```", global_step=start_step)
        if run_name is not None:
            self.writer.add_text("run_name", run_name, global_step=start_step)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, log_dir: Path, run_name: str | None, config: dict[str, Any]) -> None:
        import wandb

        kwargs: dict[str, Any] = {"project": os.environ.get("WANDB_PROJECT") or "astrai", "config": config}
        if run_name is not None:
            kwargs["name"] = run_name
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(log_dir)
        self.run = wandb.init(**kwargs)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    def __init__(self, log_dir: Path, run_name: str | None, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:  # a local store beside metrics.jsonl
            uri = f"sqlite:///{(Path(log_dir) / 'mlflow.db').resolve()}"
            artifacts = (Path(log_dir) / "mlartifacts").resolve().as_uri()
        self.uri = uri
        self.client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "astrai"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(name, artifact_location=artifacts)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:_MLFLOW_MAX_PARAM]) for k, v in _flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out
