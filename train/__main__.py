"""`python -m train --cfg quickstart.yaml [KEY=VALUE ...] [--resume]`, plus the `report`,
`eval` and `latent-stats` subcommands. Config and file errors print one message and exit 2."""
from __future__ import annotations

from runtime.openmp import prefer_passive_wait

prefer_passive_wait()  # before anything imports torch (runtime/openmp.py)

import argparse
import json
import sys
from pathlib import Path

from model.checkpoint import CheckpointError
from model.config import ConfigError
from model.io import RadioMapError
from model.lpips import LPIPSWeightsError

USER_ERRORS = (ConfigError, CheckpointError, LPIPSWeightsError, RadioMapError, FileNotFoundError,
               NotADirectoryError, PermissionError)
EXIT_USER_ERROR, EXIT_DIVERGED = 2, 1


SUBCOMMANDS = {
    "eval": "reconstruction metrics of a checkpoint on a split",
    "latent-stats": "latent mean/std and scale factor of a checkpoint (--out stores them)",
    "latent-check": "checks of a checkpoint's latents (train/latent_check.py)",
    "pack": "a network-only checkpoint for serving and bundling",
    "report": "RUN_DIR/report.html: curves, samples, validation",
    "figures": "the figures of docs/quality.md",
}


def _bundled_configs() -> str:
    from model.config import CONFIG_DIR
    return ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))


def _train_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:13} {what}" for name, what in SUBCOMMANDS.items())
    p = argparse.ArgumentParser(
        prog="python -m train", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the RadioDiff VAE-GAN.",
        epilog=f"subcommands (python -m train NAME --help):\n{listing}")
    p.add_argument("--cfg", required=True, help="a YAML path or a bundled config name "
                   f"({_bundled_configs()})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. trainer.batch_size=4")
    p.add_argument("--resume", action="store_true", help="continue from the latest model-N.pt "
                   "in trainer.results_folder (a fresh start if there is none)")
    return p


def train_command(argv: list[str]) -> int:
    args = _train_parser().parse_args(argv)
    from model.run_config import load_config
    from radiomaps import DataError
    from runtime.distributed import teardown
    from train.trainer import Trainer, TrainingDiverged, checkpoint_to_resume, gather_inputs
    trainer = None
    try:
        cfg = load_config(args.cfg, args.overrides)
        resume = checkpoint_to_resume(cfg, latest=args.resume)
        trainer = Trainer(cfg, *gather_inputs(cfg))
        if resume is not None and not _resume(trainer, resume):
            return 0
        if resume is None and args.resume:
            _say(trainer, f"--resume: no model-N.pt in {cfg.trainer.results_folder}; "
                          "starting from step 0")
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


def _resume(trainer, path: Path) -> bool:
    """Load `path` into the trainer and say so; False when that run is already finished."""
    note = trainer.resume(path)
    if trainer.finished:
        _say(trainer, f"{path}: already finished (step {trainer.step} of trainer.train_num_steps "
                      f"{trainer.cfg.trainer.train_num_steps}); nothing to do, {trainer.run_dir} "
                      "is left unchanged (raise trainer.train_num_steps to train on)")
        return False
    _say(trainer, f"resuming from {path} at step {trainer.step}" + (f"; {note}" if note else ""))
    return True


def _say(trainer, message: str) -> None:
    trainer.say(message)


def report_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train report", allow_abbrev=False,
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
    from train.split_commands import add_split_arguments
    p = argparse.ArgumentParser(prog="python -m train eval", allow_abbrev=False,
                                description="Reconstruction PSNR/SSIM/NMSE/RMSE and radio-map "
                                            "metrics (dB) of a checkpoint (EMA weights) on a "
                                            "data split, at native and at model resolution, "
                                            "with the worst maps by PSNR.")
    add_split_arguments(p, "test")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    args = p.parse_args(argv)
    from radiomaps import DataError
    from train.evaluate import evaluate_checkpoint, format_definitions, format_table
    from train.split_commands import write_json
    try:
        results = evaluate_checkpoint(args.ckpt, args.split, args.cfg, args.overrides,
                                      use_ema=not args.no_ema, max_maps=args.max_maps)
    except (*USER_ERRORS, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(format_table(results))
    print(format_definitions(results))
    write_json(results, args.json)
    return 0


def latent_stats_command(argv: list[str]) -> int:
    """`latent-stats`: see train/latent_stats.py."""
    from radiomaps import DataError
    from train.latent_stats import command
    return command(argv, (*USER_ERRORS, DataError))


def latent_check_command(argv: list[str]) -> int:
    """`latent-check`: see train/latent_check.py."""
    from radiomaps import DataError
    from train.latent_check import command
    return command(argv, (*USER_ERRORS, DataError))


def _user_errors_exit_2(command, argv: list[str], errors: tuple[type[Exception], ...]) -> int:
    """Run a subcommand's `command(argv)`; a user error prints one line and returns 2."""
    try:
        return command(argv)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


def pack_command(argv: list[str]) -> int:
    """`pack`: see train/pack.py."""
    from train.pack import command
    return _user_errors_exit_2(command, argv, USER_ERRORS)


def figures_command(argv: list[str]) -> int:
    """`figures`: see train/figures.py."""
    from radiomaps import DataError
    from train.figures import command
    return _user_errors_exit_2(command, argv,
                               (*USER_ERRORS, DataError, KeyError, json.JSONDecodeError))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"report": report_command, "eval": eval_command,
                "latent-stats": latent_stats_command, "latent-check": latent_check_command,
                "figures": figures_command,
                "pack": pack_command}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return train_command(argv)


if __name__ == "__main__":
    sys.exit(main())
