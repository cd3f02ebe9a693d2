"""Ray-traced radio maps of the synthetic cities (Sionna RT), written in RadioMapSeer's layout.

The scene follows RadioMapSeer's description (Levie et al., "RadioUNet", IEEE TWC 2021;
Yapar et al., "Dataset of pathloss and ToA radio maps", arXiv:2212.11777): 256 x 256 m
maps of 1 m pixels, buildings extruded to 25 m, transmitter and receivers 1.5 m above the
ground, 5.9 GHz, isotropic antennas; gain clipped to [-147, -47] dB on the same gray scale
(model/io.py), 0 inside buildings, the floor where no path arrives. RadioMapSeer's
simulator (WinProp) does not publish its material parameters: walls are ITU-R P.2040
concrete and the ground ITU medium-dry ground here (Sionna's ITU materials), and buildings
are opaque (no refraction), as RadioMapSeer's maps are dark indoors.

Three settings, named after the RadioMapSeer simulation they resemble:
DPM (line of sight + one diffraction), IRT2 (up to 2 reflections/diffractions), IRT4 (4).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model.io import GAIN_MAX_DB, GAIN_MIN_DB, write_png
from model.manifest import sha256_file, write_json_atomic
from runtime.progress import status

from .extrude import ground_mesh, receiver_cells, wall_mesh, write_ply
from .sionna_backend import load_sionna_rt
from .synthetic import city, place_transmitter


@dataclass(frozen=True)
class Geometry:
    """RadioMapSeer's scene parameters (module docstring) and the materials chosen here."""
    frequency_hz: float = 5.9e9
    building_height_m: float = 25.0
    tx_height_m: float = 1.5
    rx_height_m: float = 1.5
    wall_material: str = "concrete"
    wall_thickness_m: float = 0.3
    ground_material: str = "medium_dry_ground"


@dataclass(frozen=True)
class Simulation:
    """Which interactions a path may have, and how many."""
    max_depth: int
    reflection: bool
    diffraction: bool = True


SIMULATIONS = {
    "DPM": Simulation(max_depth=1, reflection=False),
    "IRT2": Simulation(max_depth=2, reflection=True),
    "IRT4": Simulation(max_depth=4, reflection=True),
}
SAMPLES_PER_TX = 10 ** 6  # docs/raytrace.md: the seed-to-seed noise this gives

SCENE_XML = """<scene version="2.1.0">
  <bsdf type="itu-radio-material" id="{wall}">
    <string name="type" value="{wall}"/><float name="thickness" value="{thickness}"/>
  </bsdf>
  <bsdf type="itu-radio-material" id="{ground}">
    <string name="type" value="{ground}"/><float name="thickness" value="1.0"/>
  </bsdf>
  <shape type="ply" id="mesh-buildings">
    <string name="filename" value="buildings.ply"/><boolean name="face_normals" value="true"/>
    <ref id="{wall}" name="bsdf"/>
  </shape>
  <shape type="ply" id="mesh-ground">
    <string name="filename" value="ground.ply"/><boolean name="face_normals" value="true"/>
    <ref id="{ground}" name="bsdf"/>
  </shape>
</scene>
"""


def write_scene(folder: Path, buildings: np.ndarray, geometry: Geometry) -> Path:
    """The city as a Mitsuba/Sionna scene (XML + PLY meshes) in `folder`; returns the XML."""
    folder.mkdir(parents=True, exist_ok=True)
    write_ply(folder / "buildings.ply", *wall_mesh(buildings, geometry.building_height_m))
    write_ply(folder / "ground.ply", *ground_mesh(buildings.shape))
    xml = folder / "scene.xml"
    xml.write_text(SCENE_XML.format(wall=geometry.wall_material, ground=geometry.ground_material,
                                    thickness=geometry.wall_thickness_m))
    return xml


def _collector(mi, cells: np.ndarray, shape: tuple[int, int], height_m: float):
    """The receiver grid as an in-memory Mitsuba mesh."""
    vertices, faces = receiver_cells(cells, shape, height_m)
    mesh = mi.Mesh("receivers", vertex_count=len(vertices), face_count=len(faces))
    params = mi.traverse(mesh)
    params["vertex_positions"] = mi.Float(vertices.ravel())
    params["faces"] = mi.UInt32(faces.ravel().astype(np.uint32))
    params.update()
    return mesh


def to_gray(path_gain: np.ndarray, buildings: np.ndarray) -> np.ndarray:
    """Linear path gain -> RadioMapSeer's [0, 1] gray scale; no path and buildings -> 0."""
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(path_gain)
    gray = np.clip((db - GAIN_MIN_DB) / (GAIN_MAX_DB - GAIN_MIN_DB), 0.0, 1.0)
    gray[..., buildings] = 0.0
    return gray.astype(np.float32)


def raytrace_city(scene_xml: Path, buildings: np.ndarray, transmitters: list[tuple[int, int]],
                  simulation: Simulation, geometry: Geometry = Geometry(),
                  samples: int = SAMPLES_PER_TX, seed: int = 0) -> np.ndarray:
    """Gray-scale path gain [K, H, W] for each transmitter (row, col) in one city."""
    rt = load_sionna_rt()
    import mitsuba as mi

    scene = rt.load_scene(str(scene_xml))
    scene.frequency = geometry.frequency_hz
    scene.tx_array = rt.PlanarArray(num_rows=1, num_cols=1, pattern="iso", polarization="V")
    scene.rx_array = scene.tx_array
    h, w = buildings.shape
    for k, (row, col) in enumerate(transmitters):
        scene.add(rt.Transmitter(f"tx{k}", position=mi.Point3f(col - (w - 1) / 2,
                                                                (h - 1) / 2 - row,
                                                                geometry.tx_height_m)))
    cells = np.flatnonzero(~buildings)
    radio_map = rt.RadioMapSolver()(
        scene, measurement_surface=_collector(mi, cells, buildings.shape, geometry.rx_height_m),
        samples_per_tx=samples, max_depth=simulation.max_depth, los=True,
        specular_reflection=simulation.reflection, diffuse_reflection=False, refraction=False,
        diffraction=simulation.diffraction, seed=seed)
    per_triangle = np.asarray(radio_map.path_gain).reshape(len(transmitters), len(cells), 4)
    gain = np.zeros((len(transmitters), h * w), dtype=np.float64)
    gain[:, cells] = per_triangle.mean(-1)  # equal-area triangles: the cell's estimate
    return to_gray(gain.reshape(len(transmitters), h, w), buildings)


def seed_noise_db(a: np.ndarray, b: np.ndarray, buildings: np.ndarray,
                  above_db: float = GAIN_MIN_DB) -> float:
    """RMS dB difference of two gray maps of one transmitter over outdoor pixels lit in both
    (and above `above_db` in both)."""
    level = (above_db - GAIN_MIN_DB) / (GAIN_MAX_DB - GAIN_MIN_DB)
    lit = (np.minimum(a, b) > max(level, 0.0)) & ~buildings.astype(bool)
    if not lit.any():
        return 0.0
    diff = (a[lit].astype(np.float64) - b[lit]) * (GAIN_MAX_DB - GAIN_MIN_DB)
    return float(np.sqrt(np.mean(diff ** 2)))


# ----- the dataset on disk -------------------------------------------------------------------
class DatasetMismatch(ValueError):
    """The output folder holds a generation with other settings."""


@dataclass(frozen=True)
class Generation:
    """Everything that decides the files: a resumed run must use the same."""
    seed: int  # the cities and transmitter positions (the synthetic source's seed)
    trace_seed: int  # the ray tracer's random numbers (diffraction sampling)
    num_tx: int
    simulations: tuple[str, ...]
    samples: int
    geometry: Geometry

    def describe(self) -> dict:
        return {**asdict(self), "simulations": list(self.simulations)}


def _check_manifest(out: Path, generation: Generation) -> None:
    manifest = out / "raytrace.json"
    wanted = generation.describe()
    if manifest.exists():
        held = json.loads(manifest.read_text())
        differ = sorted(k for k in wanted if held.get(k) != wanted[k])
        if differ:
            raise DatasetMismatch(f"{out} holds a ray-traced generation with other settings "
                                  f"({', '.join(f'{k}: {held.get(k)} here, {wanted[k]} asked' for k in differ)}); "
                                  f"use another --out or the same options")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, wanted)


def map_files(out: Path, map_id: int, generation: Generation) -> list[Path]:
    """Every file that map `map_id` owns in the dataset."""
    files = [out / "png/buildings_complete" / f"{map_id}.png"]
    for tx in range(generation.num_tx):
        files.append(out / "png/antennas" / f"{map_id}_{tx}.png")
        files += [out / "gain" / name / f"{map_id}_{tx}.png" for name in generation.simulations]
    return files


def is_complete(out: Path, map_id: int, generation: Generation) -> bool:
    """True when the map's record exists and every file it lists is there, unchanged."""
    record = out / "raytrace" / f"{map_id}.json"
    if not record.exists():
        return False
    hashes = json.loads(record.read_text()).get("sha256", {})
    for path in map_files(out, map_id, generation):
        key = str(path.relative_to(out))
        if key not in hashes or not path.exists() or sha256_file(path) != hashes[key]:
            return False
    return True


def _write(path: Path, image: np.ndarray) -> None:
    """PNG written whole or not at all (temp name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    write_png(tmp, image)
    os.replace(tmp, path)


def generate_map(out: Path, map_id: int, generation: Generation) -> dict[str, float]:
    """Ray-trace one city with all its transmitters and settings; the record is written
    last, so a map killed half-way has none and is done again. Returns seconds per setting."""
    buildings = city(generation.seed, map_id)
    transmitters = [place_transmitter(np.random.default_rng([generation.seed, map_id, 1 + tx]),
                                      buildings) for tx in range(generation.num_tx)]
    scene_xml = write_scene(out / "scenes" / str(map_id), buildings, generation.geometry)
    _write(out / "png/buildings_complete" / f"{map_id}.png", buildings.astype(np.float32))
    for tx, pos in enumerate(transmitters):
        antenna = np.zeros(buildings.shape, np.float32)
        antenna[pos] = 1.0
        _write(out / "png/antennas" / f"{map_id}_{tx}.png", antenna)
    seconds = {}
    for name in generation.simulations:
        start = time.perf_counter()
        gains = raytrace_city(scene_xml, buildings, transmitters, SIMULATIONS[name],
                              generation.geometry, generation.samples,
                              seed=generation.trace_seed * 1_000_003 + map_id)
        seconds[name] = time.perf_counter() - start
        for tx, gain in enumerate(gains):
            _write(out / "gain" / name / f"{map_id}_{tx}.png", gain)
    files = map_files(out, map_id, generation)
    (out / "raytrace").mkdir(exist_ok=True)
    write_json_atomic(out / "raytrace" / f"{map_id}.json",
                 {"seconds": seconds, "sha256": {str(p.relative_to(out)): sha256_file(p) for p in files}})
    return seconds


def generate(out: str | Path, map_ids: list[int], generation: Generation, log=print) -> dict:
    """Every map of `map_ids` in `out`; finished, verified maps are kept. Returns a summary."""
    out = Path(out)
    _check_manifest(out, generation)
    kept, done, seconds = 0, 0, {name: [] for name in generation.simulations}
    start = time.monotonic()
    for i, map_id in enumerate(map_ids, 1):
        if is_complete(out, map_id, generation):
            kept += 1
            continue
        for name, s in generate_map(out, map_id, generation).items():
            seconds[name].append(s)
        done += 1
        took = ", ".join(f"{n} {s[-1]:.1f} s" for n, s in seconds.items())
        log(f"map {map_id}: {generation.num_tx} transmitters, {took}; "
            + status("raytrace", i, len(map_ids), "cities", time.monotonic() - start))
    return {"kept": kept, "generated": done,
            "seconds_per_map": {n: float(np.median(s)) for n, s in seconds.items() if s}}
