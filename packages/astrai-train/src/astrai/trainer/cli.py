"""`astrai train`: run a training run file, resume it, or plot its loss curve.

astrai train --config run.yaml             train (the run file format: astrai.trainer.run_file)
astrai train --config run.yaml --resume    continue from the latest checkpoint of train.ckpt_dir
astrai train --config run.yaml --overwrite start again, deleting the checkpoints already in train.ckpt_dir
astrai train plot RUN_DIR                  draw RUN_DIR's loss curve to a PNG (also: --plot RUN_DIR)

A run whose ckpt_dir already holds checkpoints needs --resume or --overwrite: a new run never mixes its
step folders with an old run's. Ctrl-C (SIGINT) or SIGTERM stops training at the next optimizer-step
boundary and saves a checkpoint there; the command then says how to resume, exports nothing, and exits
with 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process a signal ended.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from astrai.trainer.plot import plot_loss

    plot_dir = args.run_dir if args.action == "plot" else args.plot
    if args.action == "plot" and args.run_dir is None:
        raise ValueError("plot needs a RUN_DIR (the log folder, or a folder above it)")
    if plot_dir is not None:
        print(plot_loss(plot_dir))
        return 0
    if args.config is None:
        raise ValueError("--config RUN_FILE is required (or 'plot RUN_DIR')")

    from astrai.serialization import clear_checkpoints, latest_checkpoint
    from astrai.trainer.run_file import build_train_config, read_run_file
    from astrai.trainer.trainer import Trainer

    run = read_run_file(args.config)
    config = build_train_config(run, Path(args.config).resolve().parent)
    checkpoint = latest_checkpoint(config.ckpt_dir)
    if args.resume:
        if checkpoint is None:
            raise ValueError(f"--resume: no checkpoint in train.ckpt_dir={config.ckpt_dir}")
        print(f"resuming from {checkpoint}")
    elif checkpoint is not None:
        if not args.overwrite:
            raise ValueError(
                f"train.ckpt_dir={config.ckpt_dir} already holds checkpoints (latest: {checkpoint.name}): "
                "pass --resume to continue that run, or --overwrite to delete them and start again"
            )
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once
            clear_checkpoints(config.ckpt_dir)
        checkpoint = None
    result = Trainer(config, run_config=run).train(checkpoint)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun every rank runs this command; the first one reports and exports
    if result.stop_signal is not None:
        saved = latest_checkpoint(config.ckpt_dir)
        command = shlex.join(["astrai", "train", "--config", args.config, "--resume"])
        where = f"checkpoint: {saved}\nresume with: {command}" if saved else "no checkpoint (no step completed)"
        print(
            f"training interrupted ({signal.Signals(result.stop_signal).name}) at step {result.step}; "
            f"nothing exported; {where}",
            file=sys.stderr,
        )
        return 128 + result.stop_signal
    try:
        print(f"loss curve: {plot_loss(config.log_dir)}")
    except Exception as exc:  # the curve is a convenience: never let it stop the export
        print(f"astrai train: warning: no loss curve: {exc}", file=sys.stderr)
    if run.get("output") is not None:
        from astrai.trainer.export import export_model

        final = latest_checkpoint(config.ckpt_dir)
        print(f"model: {export_model(run, Path(args.config).resolve().parent, final)}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """Train a model from a YAML/JSON run file, resume it, or plot its loss curve."""
    parser.add_argument("action", nargs="?", choices=["plot"], help="'plot RUN_DIR': draw a run's loss curve")
    parser.add_argument("run_dir", nargs="?", help="with 'plot': the run's log folder (or a folder above it)")
    parser.add_argument("--config", metavar="RUN_FILE", help="the run file (YAML or JSON)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of ckpt_dir")
    start.add_argument(
        "--overwrite", action="store_true", help="delete the checkpoints already in ckpt_dir and start again"
    )
    parser.add_argument("--plot", metavar="RUN_DIR", help="draw RUN_DIR's loss curve to a PNG and exit")
    parser.set_defaults(run=_run)
