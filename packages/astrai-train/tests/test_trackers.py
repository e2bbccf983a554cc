"""Experiment trackers (`TrainConfig.report_to`): short real training runs, each tracker's records read
back with that tracker's own reader and compared with metrics.jsonl; DPO's reward metrics through the
trainer against a hand computation; a missing library fails before training, naming the extra."""

from __future__ import annotations

import json
import math
import struct
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from astrai.serialization import Checkpoint
from astrai.trainer import Trainer, read_metrics

REPO = Path(__file__).resolve().parents[3]
LOGGED = ("loss", "lr", "grad_norm", "tokens_per_sec")


def _train(tmp_path, make_lm, make_config, dataset, **overrides) -> list[dict]:
    config = make_config(
        tmp_path, make_lm(), dataset, batch_per_device=2, metrics=list(LOGGED), max_grad_norm=1.0, **overrides
    )
    Trainer(config).train()
    return read_metrics(tmp_path / "logs" / "metrics.jsonl")


def _history(records: list[dict], name: str) -> list[tuple[int, float]]:
    return [(r["step"], r[name]) for r in records if r.get(name) is not None]


def _f32(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """TensorBoard stores scalars as float32."""
    return [(step, float(torch.tensor(v, dtype=torch.float32))) for step, v in points]


def _tensorboard_scalars(folder: Path, name: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(name)]


def test_tensorboard_event_file_holds_the_metrics(tmp_path: Path, make_lm, make_config, sft_dataset) -> None:
    records = _train(tmp_path, make_lm, make_config, sft_dataset, report_to=["tensorboard"])
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for name in LOGGED:
        assert _tensorboard_scalars(tmp_path / "logs" / "tensorboard", name) == _f32(_history(records, name)), name


def test_tensorboard_resume_purges_the_interrupted_steps(tmp_path: Path, make_lm, make_config, sft_dataset) -> None:
    """A run resumed from step 2 rewrites steps 3 and 4: TensorBoard, like metrics.jsonl, shows them once."""
    first = _train(tmp_path, make_lm, make_config, sft_dataset, report_to="tensorboard", ckpt_interval=2)
    config = make_config(
        tmp_path,
        make_lm(),
        sft_dataset,
        batch_per_device=2,
        metrics=["loss"],
        report_to=["tensorboard"],
    )
    Trainer(config).train(Checkpoint.load(tmp_path / "ckpt" / "step_00000002"))
    records = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and len(first) == 4
    assert len(list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))) == 2  # both runs wrote
    assert _tensorboard_scalars(tmp_path / "logs" / "tensorboard", "loss") == _f32(_history(records, "loss"))


def _wandb_records(path: Path):
    """The records of a W&B transaction log (`run-ID.wandb`): a 7-byte header, then LevelDB-log style
    32 KiB blocks of chunks (CRC32C, length, type), each record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, offset, pending = 32768, 7, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a chunk header is padding
            offset += block - offset % block
            continue
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7])
        chunk, offset = data[offset + 7 : offset + 7 + length], offset + 7 + length
        if kind == 0:  # zero padding
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL / FIRST start a record
        if kind in (1, 4):  # FULL / LAST end it
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_the_metrics(tmp_path: Path, make_lm, make_config, sft_dataset, monkeypatch) -> None:
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    records = _train(tmp_path, make_lm, make_config, sft_dataset, report_to=["wandb"], run_name="sft-test")

    (run_file,) = (tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[str, list[tuple[int, float]]] = {}
    config: dict[str, object] = {}
    run_name = None
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
        elif kind in ("run", "config"):  # the run's initial config, then any updates
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in update})
            run_name = record.run.display_name if kind == "run" else run_name
    assert run_name == "sft-test"
    assert config["train"]["report_to"] == ["wandb"] and config["train"]["strategy"] == "sft"
    for name in LOGGED:
        assert history[name] == _history(records, name), name


def test_mlflow_metric_history_equals_metrics_jsonl(
    tmp_path: Path, make_lm, make_config, sft_dataset, monkeypatch
) -> None:
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    records = _train(tmp_path, make_lm, make_config, sft_dataset, report_to=["mlflow"])

    client = MlflowClient(f"sqlite:///{tmp_path / 'logs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("astrai")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.strategy"] == "sft" and run.data.params["train.report_to"] == '["mlflow"]'
    for name in LOGGED:
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(history) == _history(records, name), name
    assert experiment.artifact_location == (tmp_path / "logs" / "mlartifacts").resolve().as_uri()


def _logp(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the scored tokens t >= 1 of log p(ids[t] | ids[<t]), one row at a time."""
    out = []
    for row, scored in zip(ids, mask):
        log_probs = torch.log_softmax(model(row[None])["logits"][0].double(), -1)
        out.append(sum(log_probs[t - 1, row[t]] for t in range(1, len(row)) if scored[t]))
    return torch.stack(out)


@pytest.mark.parametrize("nprocs", [1, 2])
def test_dpo_reward_metrics_reach_metrics_jsonl_and_the_trackers(
    tmp_path: Path, make_lm, make_config, monkeypatch, nprocs: int
) -> None:
    """One optimizer step of 4 pairs in 2 micro-batches (on each of 2 DDP ranks) with precomputed reference
    log-probs: the record's rewards/* are TRL's beta (logp_pi - logp_ref) means over all 4 pairs, computed
    here by hand, and only rank 0 reports."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    g = torch.Generator().manual_seed(0)
    n, t, beta = 4, 6, 0.3
    mask = torch.zeros(n, t, dtype=torch.bool)
    mask[:, 2:] = True  # a 2-token prompt
    chosen, rejected = torch.randint(0, 64, (n, t), generator=g), torch.randint(0, 64, (n, t), generator=g)
    ref_chosen, ref_rejected = -torch.rand(n, generator=g) * 20 - 10, -torch.rand(n, generator=g) * 20 - 10
    pairs = [
        {
            "chosen": chosen[i],
            "rejected": rejected[i],
            "chosen_mask": mask[i],
            "rejected_mask": mask[i],
            "ref_chosen_logps": ref_chosen[i],
            "ref_rejected_logps": ref_rejected[i],
        }
        for i in range(n)
    ]
    model = make_lm()
    with torch.no_grad():
        c = beta * (_logp(model, chosen, mask) - ref_chosen)
        r = beta * (_logp(model, rejected, mask) - ref_rejected)
    assert 0 < (c > r).sum() < n
    config = make_config(
        tmp_path,
        model,
        pairs,
        strategy="dpo",
        extra_kwargs={"beta": beta},
        batch_per_device=2 // nprocs,
        grad_accum_steps=2,
        report_to=["tensorboard"],
        nprocs=nprocs,
        parallel_mode="ddp" if nprocs > 1 else "none",
    )
    Trainer(config).train()
    (record,) = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    expected = {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).double().mean(),
    }
    for name, value in expected.items():
        assert record[name] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name
        assert _tensorboard_scalars(tmp_path / "logs" / "tensorboard", name) == _f32([(1, record[name])])
    assert math.isfinite(record["logps/chosen"]) and math.isfinite(record["logps/rejected"])
    assert len(list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only


@pytest.mark.parametrize(
    "tracker, blocked",
    [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow"), ("mlflow", "alembic")],
)
def test_missing_tracker_library_fails_before_training(
    tmp_path: Path, make_lm, make_config, sft_dataset, monkeypatch, tracker: str, blocked: str
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, blocked, None)  # import fails as if it were not installed
    config = make_config(tmp_path, make_lm(), sft_dataset, report_to=[tracker])
    with pytest.raises(
        ValueError, match=rf"report_to='{tracker}' needs the {blocked} library.*astrai-train\[{tracker}\]"
    ):
        Trainer(config)
    assert not (tmp_path / "logs").exists()


def test_the_extras_and_the_test_environment_install_the_trackers() -> None:
    """astrai-train's extras name each tracker's library, and the environments that run these tests
    (hatch's dev env and test.train) install them."""
    project = tomllib.loads((REPO / "packages" / "astrai-train" / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(extras["trackers"]) == {"astrai-train[tensorboard,wandb,mlflow]"}
    hatch = tomllib.loads((REPO / "hatch.toml").read_text())["envs"]
    test_train = {
        d["value"] for d in hatch["test"]["overrides"]["matrix"]["dist"]["dependencies"] if "train" in d["if"]
    }
    for name in ("tensorboard", "wandb", "mlflow"):
        for requirement in extras[name]:
            assert requirement in hatch["default"]["dependencies"], requirement
            assert requirement in test_train, requirement
