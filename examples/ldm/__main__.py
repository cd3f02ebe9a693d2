"""`python -m examples.ldm --latents DIR --model reference --out DIR`: encode the synthetic
splits to latent shards if they are not there yet (`python -m export latents`), start a server
on the VAE, train the small conditional LDM from the shards, and evaluate it on held-out test
maps decoded through the server's /decode, beside the VAE's own reconstruction; writes
OUT/result.json, OUT/curve.jsonl (held-out val figures against step and CPU time), OUT/ldm.pt."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .data import SCALES, LatentPairs
from .evaluate import evaluate_ldm, evaluate_vae
from .serve import REPO, server_process
from .train import TrainOptions, train
from .unet import UNet

SPLITS = ("train", "val", "test")


def ensure_latents(folder: Path, model: str, split: str, data: list[str]) -> None:
    """`python -m export latents` for `split` unless `folder` already holds its index."""
    if (folder / "index.json").exists():
        return
    cmd = [sys.executable, "-m", "export", "latents", "--ckpt", model, "--split", split,
           "--out", str(folder), "--path", "default", *data]
    subprocess.run(cmd, cwd=REPO, check=True)


def _headline(block: dict) -> dict:
    m, d = block["metrics"], block["definitions"]
    return {"psnr": m["psnr"]["mean"], "ssim": m["ssim"]["mean"], "nmse": m["nmse"]["mean"],
            "rmse_db": m["rmse_db"]["mean"],
            "radiodiff_psnr": d["radiodiff"]["metrics"]["psnr"]["mean"],
            "radiodiff_ssim": d["radiodiff"]["metrics"]["ssim"]["mean"],
            "radiounet_nmse": d["radiounet"]["metrics"]["nmse"]["mean"],
            "worst_psnr": block["worst"][0]["psnr"], "worst_map": block["worst"][0]["name"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.ldm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", required=True, help="folder of train/ val/ test/ latent shards "
                                                    "(encoded there when missing)")
    p.add_argument("--model", default="reference", help="the VAE: checkpoint, run dir or "
                                                        "bundled name, served for /decode")
    p.add_argument("--out", required=True)
    p.add_argument("data", nargs="*", metavar="KEY=VALUE",
                   help="data overrides for encoding, e.g. data.num_tx=2")
    p.add_argument("--scale", choices=SCALES, default="measured")
    p.add_argument("--posterior", choices=("sample", "mean"), default="sample",
                   help="train on fresh posterior samples (RadioDiff) or on the means")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--curve-maps", type=int, default=16, help="val maps per curve point")
    p.add_argument("--test-maps", type=int, default=None, help="default: the whole test split")
    p.add_argument("--train-maps", type=int, default=None, help="default: the whole split")
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--widths", default="48,96,128,128")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root, out = Path(args.latents), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        ensure_latents(root / split, args.model, split, args.data)
    sample = args.posterior == "sample"
    train_data = LatentPairs(root / "train", args.scale, sample, args.seed, args.train_maps)
    val = LatentPairs(root / "val", args.scale, False, args.seed, args.curve_maps)
    test = LatentPairs(root / "test", args.scale, False, args.seed, args.test_maps)
    widths = tuple(int(w) for w in args.widths.split(","))
    torch.manual_seed(args.seed)
    unet = UNet(train_data.shards.index["latent_shape"][0], widths=widths)
    options = TrainOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           eval_every=args.eval_every, amp=args.amp, seed=args.seed)
    curve = out / "curve.jsonl"
    curve.unlink(missing_ok=True)
    with server_process(args.model, out / "server.log", args.server_threads) as client:
        def on_val(ema: torch.nn.Module) -> dict:
            block = evaluate_ldm(ema, val, client, list(range(len(val))), args.ddim_steps,
                                 args.seed)
            return {f"val_{k}": v for k, v in _headline(block).items()}
        start_cpu, start = time.process_time(), time.perf_counter()
        ema = train(unet, train_data, options, curve, on_val)
        train_cpu = time.process_time() - start_cpu
        torch.save({"ema": ema.state_dict(), "widths": widths, "args": vars(args)}, out / "ldm.pt")
        rows = list(range(len(test)))
        ldm = evaluate_ldm(ema, test, client, rows, args.ddim_steps, args.seed + 1000)
        vae = evaluate_vae(test, client, rows)
        restarts = client.restarts
    result = {"args": vars(args), "options": asdict(options),
              "parameters": sum(p.numel() for p in unet.parameters()),
              "train_maps": len(train_data), "test_maps": len(test),
              "cpu_s_this_process": train_cpu, "wall_s": time.perf_counter() - start,
              "server_restarts": restarts,
              "ldm": _headline(ldm), "vae": _headline(vae),
              "ldm_detail": ldm, "vae_detail": vae}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ldm": result["ldm"], "vae": result["vae"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
