"""`python -m train --cfg quickstart.yaml [KEY=VALUE ...] [--resume]`, plus the `report` and
`eval` subcommands. Config and file errors print one message and exit 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.checkpoint import CheckpointError, latest_checkpoint
from model.config import ConfigError
from model.io import RadioMapError
from model.lpips import LPIPSWeightsError

USER_ERRORS = (ConfigError, CheckpointError, LPIPSWeightsError, RadioMapError, FileNotFoundError,
               NotADirectoryError, PermissionError)
EXIT_USER_ERROR, EXIT_DIVERGED = 2, 1


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train the RadioDiff VAE-GAN. Subcommands: `report RUN_DIR`, "
                    "`eval --ckpt CKPT --split test`.")
    p.add_argument("--cfg", required=True, help="a YAML path or a bundled config name "
                   "(quickstart.yaml, first_radio.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. trainer.batch_size=4")
    p.add_argument("--resume", action="store_true", help="continue from the latest model-N.pt "
                   "in trainer.results_folder (a fresh start if there is none)")
    return p


def train_command(argv: list[str]) -> int:
    args = _train_parser().parse_args(argv)
    from train.config import load_config
    from train.data import DataError
    from train.distributed import teardown
    from train.trainer import Trainer, TrainingDiverged, checkpoint_to_resume
    trainer = None
    try:
        cfg = load_config(args.cfg, args.overrides)
        resume = checkpoint_to_resume(cfg, latest=args.resume)
        trainer = Trainer(cfg)
        if resume is not None:
            trainer.resume(resume)
            _say(trainer, f"resuming from {resume} at step {trainer.step}")
        elif args.resume:
            _say(trainer, f"--resume: no model-N.pt in {cfg.trainer.results_folder}; "
                          "starting from step 0")
        elif latest_checkpoint(cfg.trainer.results_folder) is not None:
            _say(trainer, f"note: {cfg.trainer.results_folder} holds checkpoints of an earlier "
                          "run; this fresh run overwrites them (--resume continues it instead)")
        signum = trainer.train()
    except (*USER_ERRORS, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        if trainer is not None:
            teardown(trainer.env)
    if signum is not None:
        _say(trainer, f"stopped by signal at step {trainer.step}; checkpoint saved in "
                      f"{cfg.trainer.results_folder}; continue with --resume")
        return 128 + signum
    _say(trainer, f"done: {trainer.step} steps; checkpoints, samples and metrics.jsonl in "
                  f"{cfg.trainer.results_folder}")
    return 0


def _say(trainer, message: str) -> None:
    if trainer.env.is_main:
        print(message, flush=True)


def report_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train report",
                                description="Write RUN_DIR/report.html: loss curves, phase "
                                            "switch, sample grids, validation table.")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output file (default RUN_DIR/report.html)")
    args = p.parse_args(argv)
    from train.report import write_report
    try:
        path = write_report(args.run_dir, args.out)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"wrote {path}")
    return 0


def eval_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train eval",
                                description="Reconstruction PSNR/SSIM/NMSE/RMSE of a checkpoint "
                                            "(EMA weights) on a data split.")
    p.add_argument("--ckpt", required=True, help="a model-N.pt file or a run directory")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--cfg", help="config for the data (and the model, for upstream checkpoints); "
                   "default: the config stored in the checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    from train.data import DataError
    from train.evaluate import evaluate_checkpoint, format_table
    try:
        results = evaluate_checkpoint(args.ckpt, args.split, args.cfg, args.overrides,
                                      use_ema=not args.no_ema)
    except (*USER_ERRORS, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(format_table(results))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"report": report_command, "eval": eval_command}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return train_command(argv)


if __name__ == "__main__":
    sys.exit(main())
