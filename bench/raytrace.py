"""Ray-traced data: seconds per transmitter and seed-to-seed noise, per setting and ray count.

    python -m bench.raytrace --maps 3 --simulations DPM,IRT2 --samples 100000,1000000

For each city, each setting and each ray count, the same transmitter is traced with two
ray-tracer seeds; the noise is the RMS dB difference between the two maps over outdoor pixels
lit in both (radiomaps/raytrace.py seed_noise_db), also over those above -107 dB (40 dB
over the floor) in both; `lit` is the share of outdoor pixels that a path reaches. Writes bench/measurements/raytrace.json and prints a table.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import MEASUREMENTS, bench_parser, machine, markdown_table, parse_ints, write_json
from radiomaps.raytrace import SIMULATIONS, Geometry, raytrace_city, seed_noise_db, write_scene
from radiomaps.sionna_backend import load_sionna_rt
from radiomaps.synthetic import city, place_transmitter


def measure(map_id: int, name: str, samples: int, folder: Path, seed: int = 42) -> dict:
    """Two traces of transmitter 0 of one city with different seeds: time, noise, coverage."""
    buildings = city(seed, map_id)
    tx = [place_transmitter(np.random.default_rng([seed, map_id, 1]), buildings)]
    xml = write_scene(folder / str(map_id), buildings, Geometry())
    maps, seconds = [], []
    for trace_seed in (1, 2):
        start = time.perf_counter()
        maps.append(raytrace_city(xml, buildings, tx, SIMULATIONS[name], samples=samples,
                                  seed=trace_seed)[0])
        seconds.append(time.perf_counter() - start)
    outdoors = ~buildings
    return {"map": map_id, "simulation": name, "samples": samples,
            "seconds": statistics.median(seconds),
            "noise_db": seed_noise_db(maps[0], maps[1], buildings),
            "noise_db_above_-107": seed_noise_db(maps[0], maps[1], buildings, above_db=-107.0),
            "share_above_-107": float((np.minimum(*maps)[outdoors] > 0.4).mean()),
            "lit": float((maps[0][outdoors] > 0).mean()),
            "lit_in_one_only": float(((maps[0] > 0) != (maps[1] > 0))[outdoors].mean())}


def main() -> None:
    parser = bench_parser("raytrace", __doc__)
    parser.add_argument("--maps", type=int, default=3, help="cities 1..N")
    parser.add_argument("--simulations", default="DPM,IRT2")
    parser.add_argument("--samples", type=parse_ints, default=[10 ** 5, 10 ** 6])
    parser.add_argument("--threads", type=int, default=0, help="Dr.Jit threads (0: all cores)")
    parser.add_argument("--out", type=Path, default=MEASUREMENTS / "raytrace.json")
    args = parser.parse_args()
    rt = load_sionna_rt()
    import drjit
    import mitsuba
    if args.threads:
        drjit.set_thread_count(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.simulations.split(","):
            for samples in args.samples:
                for map_id in range(1, args.maps + 1):
                    rows.append(measure(map_id, name, samples, Path(tmp)))
                    print(rows[-1], flush=True)
    summary = []
    for name in args.simulations.split(","):
        for samples in args.samples:
            group = [r for r in rows if r["simulation"] == name and r["samples"] == samples]
            summary.append({"simulation": name, "samples": f"{samples:.0e}",
                            "s per tx (median)": f"{statistics.median(r['seconds'] for r in group):.1f}",
                            "noise dB RMS (median / max)": f"{statistics.median(r['noise_db'] for r in group):.2f} / {max(r['noise_db'] for r in group):.2f}",
                            "noise dB RMS above -107 dB (median / max)": f"{statistics.median(r['noise_db_above_-107'] for r in group):.2f} / {max(r['noise_db_above_-107'] for r in group):.2f}",
                            "lit": f"{statistics.median(r['lit'] for r in group):.2f}",
                            "above -107 dB": f"{statistics.median(r['share_above_-107'] for r in group):.2f}",
                            "lit in one seed only": f"{statistics.median(r['lit_in_one_only'] for r in group):.3f}"})
    info = machine()
    info.update(sionna_rt=rt.__version__, variant=mitsuba.variant(),
                drjit_threads=drjit.thread_count())
    write_json(args.out, {"machine": info, "rows": rows, "summary": summary})
    print(f"{info['cpu']}, {info['cpu_count']} cores, Dr.Jit threads {info['drjit_threads']}, "
          f"{info['variant']}")
    print(markdown_table(summary, list(summary[0])))


if __name__ == "__main__":
    main()
