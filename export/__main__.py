"""`python -m export`: ONNX encoder/decoder graphs (and optionally a diffusers folder) from a
checkpoint, checked against torch before success is reported. `python -m export latents ...`
encodes a data split into latent shards instead (export/latents.py).

Exit status: 0 success; 1 export or verification failed (figures printed); 2 bad input.
"""
from __future__ import annotations

from runtime.openmp import prefer_passive_wait

prefer_passive_wait()  # before anything imports torch (runtime/openmp.py)

import argparse
import sys

import yaml

try:
    import onnxruntime  # noqa: F401  an optional extra (cpu or gpu flavour), needed throughout
except ModuleNotFoundError:
    print("error: onnxruntime is not installed: pip install -e '.[cpu]' (or '.[gpu]' for CUDA)",
          file=sys.stderr)
    sys.exit(2)

from model.checkpoint import CheckpointError
from model.config import ConfigError
from model.manifest import ManifestError, ManifestMissing

from .diffusers_format import DiffusersFormatError
from .onnx_export import DEFAULT_OPSET, EXPORTERS, ExportError
from .ort_session import PROVIDER_CHOICES
from .pipeline import FORMATS, ExportOptions, ParityError, run_export, verify_export


def _formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of "
                                         f"{list(FORMATS)}, got {text!r}")
    return formats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint file (ours or upstream model-N.pt) or run directory "
                                  "(its latest model-N.pt)")
    p.add_argument("--out", help="output directory (encoder.onnx, decoder.onnx, manifest.json)")
    p.add_argument("--config", help="YAML with a `model` section; required for upstream files, "
                                    "which store no config (e.g. first_radio.yaml)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--fp16", action="store_true",
                   help="half-precision graphs (for GPU serving); inputs/outputs stay float32")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="parity check against torch with onnxruntime (default: on)")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="torch.onnx exporter (default %(default)s)")
    p.add_argument("--format", type=_formats, default=("onnx",), dest="formats",
                   help="onnx, diffusers, or onnx,diffusers (both in --out) (default onnx)")
    p.add_argument("--no-ema", dest="use_ema", action="store_false",
                   help="export the raw `model` weights even when the checkpoint has EMA ones")
    p.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto",
                   help="onnxruntime provider for the parity check; auto = CUDA if available, "
                        "else CPU (default %(default)s)")
    p.add_argument("--verify", metavar="DIR",
                   help="instead of exporting, re-check an export directory (with --ckpt: "
                        "that it came from that checkpoint, and its parity)")
    return p


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.verify:
        verify_export(args.verify, args.ckpt, args.check, args.provider)
        return
    if not args.ckpt or not args.out:
        parser.error("--ckpt and --out are required (or --verify DIR)")
    if args.opset < 1:
        parser.error(f"--opset: expected a positive integer, got {args.opset}")
    run_export(ExportOptions(ckpt=args.ckpt, out=args.out, config=args.config, opset=args.opset,
                             fp16=args.fp16, check=args.check, exporter=args.exporter,
                             formats=args.formats, use_ema=args.use_ema, provider=args.provider))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["latents"]:  # `python -m export latents ...`: a data split to latent shards
        from .latents import main as latents_main
        return latents_main(argv[1:])
    if argv[:1] == ["radiodiff-config"]:  # the first-stage block of RadioDiff's radio_train.yaml
        from .radiodiff_config import main as radiodiff_config_main
        return radiodiff_config_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _run(args, parser)
    except (CheckpointError, ConfigError, DiffusersFormatError, ManifestMissing,
            yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ExportError, ParityError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
