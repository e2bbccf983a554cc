"""`astrai train`: run files (YAML and JSON), resume, overwrite, interruption by a signal, loss plots,
and errors that name the key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from astrai.cli.main import main
from astrai.dataset import save_mmap
from astrai.serialization import Checkpoint, latest_checkpoint
from astrai.trainer import read_metrics, read_run_file

MODEL = {"vocab_size": 256, "dim": 32, "n_layers": 1, "n_heads": 4, "dim_ffn": 64, "max_len": 32}


@pytest.fixture
def run_dir(tmp_path: Path, make_text_tokens) -> Path:
    save_mmap(tmp_path / "data", {"sequence": [make_text_tokens(2_000)]})
    return tmp_path


def _run_file(run_dir: Path, name: str = "run.yaml", **changes) -> Path:
    run = {
        "seed": 1,
        "model": {"config": dict(MODEL)},
        "data": {"path": "data", "window_size": 16},
        "optimizer": {"name": "adamw", "lr": "3e-3"},  # replaced below by a real YAML float
        "schedule": {"type": "cosine", "warmup_steps": 2, "lr_decay_steps": 20},
        "train": {
            "strategy": "seq",
            "batch_per_device": 16,
            "ckpt_dir": "ckpt",
            "log_dir": "logs",
            "log_interval": 1,
            "ckpt_interval": 4,
            "device_type": "cpu",
        },
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            run[section][field] = value
        elif value is None:
            run.pop(section)
        else:
            run[section] = value
    path = run_dir / name
    path.write_text(yaml.safe_dump(run).replace("'3e-3'", "3e-3"))  # YAML 1.1 would read 3e-3 as text
    if name.endswith(".json"):
        path.write_text(json.dumps(read_run_file(path)))
    return path


def test_train_resume_and_plot(run_dir: Path, capsys) -> None:
    run_file = _run_file(run_dir)
    assert read_run_file(run_file)["optimizer"]["lr"] == 3e-3
    assert main(["train", "--config", str(run_file)]) == 0
    assert (run_dir / "logs" / "loss.png").stat().st_size > 0
    first = latest_checkpoint(run_dir / "ckpt")
    ckpt = Checkpoint.load(first)
    steps = ckpt.step
    assert ckpt.meta["run"] == read_run_file(run_file)  # the run file travels with the checkpoint
    assert ckpt.meta["train_config"]["n_epoch"] == 1 and ckpt.model_config["dim"] == 32

    _run_file(run_dir, train__n_epoch=2)  # the same run, one more epoch
    assert main(["train", "--config", str(run_file), "--resume"]) == 0
    assert f"resuming from {first}" in capsys.readouterr().out
    log = read_metrics(run_dir / "logs" / "metrics.jsonl")
    assert [r["step"] for r in log] == list(range(1, 2 * steps + 1))

    (run_dir / "logs" / "loss.png").unlink()
    assert main(["train", "plot", str(run_dir)]) == 0
    assert main(["train", "--plot", str(run_dir / "logs")]) == 0
    assert (run_dir / "logs" / "loss.png").stat().st_size > 0


def test_pretrained_model_and_json_run_file(run_dir: Path, make_lm) -> None:
    model = make_lm(vocab_size=256)
    model.save_pretrained(run_dir / "base")
    run_file = _run_file(run_dir, "run.json", model={"pretrained": "base"}, train__n_epoch=1)
    assert main(["train", "--config", str(run_file)]) == 0
    assert Checkpoint.load(latest_checkpoint(run_dir / "ckpt")).model_config == model.config.to_dict()


def test_output_folder_is_servable(run_dir: Path) -> None:
    from itertools import repeat

    import torch

    from astrai.model import AutoModel
    from astrai.tokenize import AutoTokenizer, train_bpe_tokenizer

    train_bpe_tokenizer(repeat("def main(): return sum(range(10))", 50), 280).save_pretrained(run_dir / "tok")
    model = {**MODEL, "vocab_size": 280}
    run_file = _run_file(run_dir, model={"config": model}, tokenizer="tok", output="models/final")
    assert main(["train", "--config", str(run_file)]) == 0
    final = AutoModel.from_pretrained(run_dir / "models" / "final")
    trained = Checkpoint.load(latest_checkpoint(run_dir / "ckpt")).state_dict
    assert all(torch.equal(final.state_dict()[k], v) for k, v in trained.items())
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "models" / "final")
    assert tokenizer.vocab_size == 280 and tokenizer.encode("def main") == AutoTokenizer.from_pretrained(
        run_dir / "tok"
    ).encode("def main")


def test_output_merges_lora_adapters(run_dir: Path, make_lm) -> None:
    import torch

    from astrai.model import AutoModel
    from astrai.trainer.lora import load_lora

    make_lm(vocab_size=256).save_pretrained(run_dir / "base")
    lora = {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    run_file = _run_file(run_dir, model={"pretrained": "base"}, train__lora=lora, output="merged")
    assert main(["train", "--config", str(run_file)]) == 0
    merged = AutoModel.from_pretrained(run_dir / "merged")
    adapted = AutoModel.from_pretrained(run_dir / "base")
    load_lora(adapted, latest_checkpoint(run_dir / "ckpt"))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids)["logits"], adapted(ids)["logits"], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids)["logits"], AutoModel.from_pretrained(run_dir / "base")(ids)["logits"])


def test_existing_checkpoints_need_resume_or_overwrite(run_dir: Path, capsys) -> None:
    run_file = _run_file(run_dir, train__ckpt_interval=1)
    assert main(["train", "--config", str(run_file)]) == 0
    old = sorted(p.name for p in (run_dir / "ckpt").iterdir())
    assert len(old) == 9  # step_00000001 ... step_00000008 and latest
    capsys.readouterr()
    assert main(["train", "--config", str(run_file)]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints (latest: step_00000008)" in err and "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == old  # nothing touched
    _run_file(run_dir, train__ckpt_interval=0)
    assert main(["train", "--config", str(run_file), "--overwrite"]) == 0
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["latest", "step_00000008"]
    assert [r["step"] for r in read_metrics(run_dir / "logs" / "metrics.jsonl")] == list(range(1, 9))
    with pytest.raises(SystemExit):  # one or the other
        main(["train", "--config", str(run_file), "--overwrite", "--resume"])


def test_keep_checkpoints_keeps_the_newest(run_dir: Path) -> None:
    run_file = _run_file(run_dir, train__ckpt_interval=1, train__keep_checkpoints=2)
    assert main(["train", "--config", str(run_file)]) == 0
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["latest", "step_00000007", "step_00000008"]


def test_run_shorter_than_log_interval_logs_its_last_step_and_exports(run_dir: Path, capsys) -> None:
    run_file = _run_file(run_dir, train__log_interval=100, output="model")
    assert main(["train", "--config", str(run_file)]) == 0
    assert [r["step"] for r in read_metrics(run_dir / "logs" / "metrics.jsonl")] == [8]
    assert (run_dir / "logs" / "loss.png").is_file() and (run_dir / "model" / "model.safetensors").is_file()


def test_a_failed_plot_is_a_warning_and_the_model_is_exported(run_dir: Path, capsys) -> None:
    run_file = _run_file(run_dir, train__metrics=["lr"], output="model")  # no loss to draw
    assert main(["train", "--config", str(run_file)]) == 0
    assert "warning: no loss curve" in capsys.readouterr().err
    assert (run_dir / "model" / "model.safetensors").is_file()


# Runs `astrai train` and waits, after step 1, for the signal the test sends (then training goes on to the
# next step boundary, where it stops).
_PAUSED_TRAIN = """
import sys
import time

from astrai.cli.main import main
from astrai.trainer.trainer import Trainer

class PauseAfterStep1:
    def on_step_end(self, ctx):
        if ctx.step == 1:
            print("STEP 1", flush=True)
            while not ctx.stop_requested:
                time.sleep(0.01)

defaults = Trainer._get_default_callbacks
Trainer._get_default_callbacks = lambda self: defaults(self) + [PauseAfterStep1()]
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_reports_and_exits_non_zero_without_export(run_dir: Path, signum: int, code: int) -> None:
    run_file = _run_file(run_dir, output="model")
    script = run_dir / "paused_train.py"
    script.write_text(textwrap.dedent(_PAUSED_TRAIN))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), "train", "--config", str(run_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "STEP 1"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code
    name = signal.Signals(signum).name
    assert f"training interrupted ({name}) at step 1; nothing exported" in err
    assert f"checkpoint: {run_dir / 'ckpt' / 'step_00000001'}" in err
    assert f"resume with: astrai train --config {run_file} --resume" in err
    assert not (run_dir / "model").exists()
    assert main(["train", "--config", str(run_file), "--resume"]) == 0  # the command it printed finishes it
    assert (run_dir / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"modle": {}}, "modle: unknown section"),
        ({"train__n_epochs": 2}, "train.n_epochs: unknown TrainConfig field"),
        ({"train__n_epoch": 0}, "TrainConfig.n_epoch=0"),
        ({"train__model": "x"}, "train.model: set by the model/data"),
        ({"data__window": 16}, "data.window: unknown key"),
        ({"data": {"path": "data"}}, "data.window_size: missing"),
        ({"model": {"config": dict(MODEL), "pretrained": "x"}}, "exactly one of model.config"),
        ({"model": {"config": {**MODEL, "dim": 30}}}, "model.config: AutoRegressiveLMConfig.dim=30"),
        ({"optimizer__betas1": 0.9}, "optimizer: optimizer 'adamw' got unexpected argument"),
        ({"optimizer__name": "lion"}, "optimizer name='lion'"),
        ({"optimizer__lr": "fast"}, "optimizer: optimizer 'adamw': lr='fast' must be a number"),
        ({"optimizer__betas": [0.9]}, "optimizer: optimizer 'adamw': betas=[0.9] must be 2 numbers"),
        ({"schedule__lr_decay_steps": -5}, "schedule: schedule 'cosine': CosineScheduler.lr_decay_steps=-5"),
        ({"schedule": {"warmup_steps": 2}}, "schedule.type: missing"),
        ({"seed": -1}, "seed: must be an int"),
        ({"output": 5}, "output: must be a path string"),
        ({"train__strategy": "ppo"}, "train.strategy='ppo': unknown strategy; known ['dpo', 'grpo', 'seq', 'sft']"),
        ({"train__report_to": ["tensorbord"]}, "TrainConfig.report_to='tensorbord': allowed: ['tensorboard'"),
        ({"data__window_size": 64}, "dataset: window_size=64 exceeds the model's max_len=32"),
        (
            {"model": {"config": {**MODEL, "vocab_size": 100}}},
            "dataset: store key 'sequence' holds token id 124, but the model's vocab_size is 100",
        ),
    ],
)
def test_run_file_errors_name_the_key(run_dir: Path, capsys, changes, message: str) -> None:
    assert main(["train", "--config", str(_run_file(run_dir, **changes))]) == 2
    assert message in capsys.readouterr().err


def test_report_to_from_a_run_file(run_dir: Path, capsys, monkeypatch) -> None:
    """`train.report_to: tensorboard` in a run file: the loss curve in TensorBoard equals metrics.jsonl and the
    run file's values are its config; a tracker whose library is missing stops the command before training."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", "--config", str(_run_file(run_dir, train__report_to="tensorboard"))]) == 0
    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    records = read_metrics(run_dir / "logs" / "metrics.jsonl")
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records
    ]
    (config,) = events.Tensors("config/text_summary")
    assert b'"lr_decay_steps": 20' in config.tensor_proto.string_val[0]

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    run_file = _run_file(run_dir, "wandb.yaml", train__report_to=["wandb"], train__ckpt_dir="ckpt-wandb")
    assert main(["train", "--config", str(run_file)]) == 2
    err = capsys.readouterr().err
    assert "report_to='wandb' needs the wandb library" in err and "pip install 'astrai-train[wandb]'" in err
    assert not (run_dir / "ckpt-wandb").exists()


def test_cli_usage_errors(run_dir: Path, capsys) -> None:
    assert main(["train"]) == 2
    assert "--config RUN_FILE is required" in capsys.readouterr().err
    assert main(["train", "--config", str(run_dir / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (run_dir / "bad.yaml").write_text("train: [unclosed")
    assert main(["train", "--config", str(run_dir / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["train", "--config", str(_run_file(run_dir)), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "plot", str(run_dir)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
