"""`python -m bench.load -- COMMAND ...`: the wall time of a whole command on an idle machine
and beside a competing busy job, and the ratio (issue: training, serving and benchmarks must
degrade gracefully when another job keeps the cores busy).

The competing job is what shares these machines in practice: a PyTorch process running
matrix products with --competing-threads intra-op threads (default: one per core), started
before the command and stopped after it. Runs alternate idle / loaded --repeats times; the
medians and their ratio are printed and, with --json, written.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import bench_parser, machine

BUSY = ("import sys, torch\n"
        "torch.set_num_threads(int(sys.argv[1]))\n"
        "a = torch.randn(1024, 1024)\n"
        "while True:\n"
        "    a = (a @ a).clamp_(-1, 1)\n")


def _timed(command: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"the command failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.monotonic() - start


def _loaded(command: list[str], env: dict[str, str], threads: int) -> float:
    busy = subprocess.Popen([sys.executable, "-c", BUSY, str(threads)],
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    try:
        time.sleep(2.0)  # let it reach full speed
        if busy.poll() is not None:
            raise SystemExit(f"the competing job exited ({busy.returncode})")
        return _timed(command, env)
    finally:
        busy.kill()
        busy.wait()


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("load", __doc__)
    p.add_argument("--repeats", type=int, default=1, help="idle/loaded pairs (default 1)")
    p.add_argument("--competing-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set for the command (not for the competing job)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command after --")
    env = {**os.environ, **dict(item.split("=", 1) for item in args.env)}
    idle, loaded = [], []
    for _ in range(args.repeats):
        idle.append(_timed(command, env))
        loaded.append(_loaded(command, env, args.competing_threads))
    result = {"machine": machine(), "command": command, "env": args.env,
              "competing_threads": args.competing_threads, "idle_s": idle, "loaded_s": loaded,
              "idle_median_s": statistics.median(idle),
              "loaded_median_s": statistics.median(loaded)}
    result["ratio"] = result["loaded_median_s"] / result["idle_median_s"]
    print(f"{' '.join(command)} {' '.join(args.env)}\n  idle {result['idle_median_s']:.1f} s, "
          f"beside a {args.competing_threads}-thread busy job {result['loaded_median_s']:.1f} s:"
          f" {result['ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
