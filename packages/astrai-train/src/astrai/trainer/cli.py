"""`astrai train`: run a training run file, resume it, or plot its loss curve.

astrai train --config run.yaml             train (the run file format: astrai.trainer.run_file)
astrai train --config run.yaml --resume    continue from the latest checkpoint of train.ckpt_dir
astrai train plot RUN_DIR                  draw RUN_DIR's loss curve to a PNG (also: --plot RUN_DIR)
"""

from __future__ import annotations

import argparse
import os
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

    from astrai.serialization import latest_checkpoint
    from astrai.trainer.run_file import build_train_config, read_run_file
    from astrai.trainer.trainer import Trainer

    run = read_run_file(args.config)
    config = build_train_config(run, Path(args.config).resolve().parent)
    checkpoint = None
    if args.resume:
        checkpoint = latest_checkpoint(config.ckpt_dir)
        if checkpoint is None:
            raise ValueError(f"--resume: no checkpoint in train.ckpt_dir={config.ckpt_dir}")
        print(f"resuming from {checkpoint}")
    Trainer(config, run_config=run).train(checkpoint)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun every rank runs this command; the first one reports and exports
    print(f"loss curve: {plot_loss(config.log_dir)}")
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
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of ckpt_dir")
    parser.add_argument("--plot", metavar="RUN_DIR", help="draw RUN_DIR's loss curve to a PNG and exit")
    parser.set_defaults(run=_run)
