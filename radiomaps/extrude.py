"""A 2D building mask made 3D for the ray tracer: wall meshes, a ground plane, a receiver grid.

Coordinates: 1 m per pixel, the map centred on the origin, x east along columns, y north
against rows (pixel (r, c) has its centre at x = c - (W-1)/2, y = (H-1)/2 - r), z up.
Walls follow the mask's outline (marching squares at level 0.5, simplified so that a rotated
wall is one flat face and not a staircase of 1 m steps, which would scatter specular
reflections); neighbouring faces share their edges, so building corners are wedges that the
ray tracer diffracts around. Roofs are left out: with antennas far below the roofs, no path
of a few interactions reaches one from above.
"""
from __future__ import annotations

from pathlib import Path

import contourpy
import numpy as np

SIMPLIFY_PX = 0.75  # outline points within this of a straight wall are dropped


def _simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Ramer-Douglas-Peucker on an open polyline [N, 2] (ends kept)."""
    if len(points) < 3:
        return points
    start, chord = points[0], points[-1] - points[0]
    length = float(np.hypot(*chord))
    rel = points - start
    dist = (np.abs(chord[0] * rel[:, 1] - chord[1] * rel[:, 0]) / length if length > 0
            else np.hypot(rel[:, 0], rel[:, 1]))
    worst = int(dist.argmax())
    if dist[worst] <= tolerance:
        return points[[0, -1]]
    return np.vstack([_simplify(points[:worst + 1], tolerance)[:-1],
                      _simplify(points[worst:], tolerance)])


def outlines(mask: np.ndarray, tolerance: float = SIMPLIFY_PX) -> list[np.ndarray]:
    """Closed building outlines (each [N, 2] (col, row) pixel coordinates, not repeated)."""
    padded = np.pad(mask.astype(np.float64), 1)  # closes outlines at the map edge
    rings = []
    for line in contourpy.contour_generator(z=padded, line_type="Separate").lines(0.5):
        points = np.asarray(line, dtype=np.float64)[:-1] - 1.0  # contourpy repeats the first
        if len(points) < 3:
            continue
        half = len(points) // 2  # split so both halves are open polylines
        closed = np.vstack([points, points[:1]])
        ring = np.vstack([_simplify(closed[:half + 1], tolerance)[:-1],
                          _simplify(closed[half:], tolerance)[:-1]])
        if len(ring) >= 3:
            rings.append(ring)
    return rings


def to_metres(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(col, row) pixel coordinates -> (x, y) metres in the scene frame."""
    h, w = shape
    return np.stack([points[..., 0] - (w - 1) / 2, (h - 1) / 2 - points[..., 1]], axis=-1)


def wall_mesh(mask: np.ndarray, height_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertical walls of height `height_m` along every outline: (vertices [V, 3], faces [F, 3])."""
    vertices, faces = [], []
    count = 0
    for ring in outlines(mask):
        xy = to_metres(ring, mask.shape)
        n = len(xy)
        ring_vertices = np.zeros((n, 2, 3), dtype=np.float32)
        ring_vertices[:, :, :2] = xy[:, None, :]
        ring_vertices[:, 1, 2] = height_m
        vertices.append(ring_vertices.reshape(-1, 3))
        i = np.arange(n)
        j = (i + 1) % n
        bottom_i, bottom_j, top_j, top_i = count + 2 * i, count + 2 * j, count + 2 * j + 1, count + 2 * i + 1
        faces.append(np.stack([bottom_i, bottom_j, top_j], 1))
        faces.append(np.stack([bottom_i, top_j, top_i], 1))
        count += 2 * n
    if not vertices:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    return np.concatenate(vertices), np.concatenate(faces).astype(np.int32)


def ground_mesh(shape: tuple[int, int], margin_m: float = 64.0) -> tuple[np.ndarray, np.ndarray]:
    """A flat ground at z = 0 reaching `margin_m` past the map on every side."""
    hx, hy = shape[1] / 2 + margin_m, shape[0] / 2 + margin_m
    vertices = np.array([(-hx, -hy, 0), (hx, -hy, 0), (hx, hy, 0), (-hx, hy, 0)], np.float32)
    return vertices, np.array([(0, 1, 2), (0, 2, 3)], np.int32)


def receiver_cells(cells: np.ndarray, shape: tuple[int, int], height_m: float,
                   span_m: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One receiver per pixel in `cells` (flat indices): two crossed vertical 1 m squares
    centred at `height_m`, four triangles each (vertices, faces); triangle 4k..4k+3 is cell k.

    A horizontal measurement plane at the antenna height collects no direct ray when the
    transmitter is at the same height (RadioMapSeer's 1.5 m both ends); vertical squares do.
    """
    rows, cols = np.unravel_index(cells, shape)
    centre = to_metres(np.stack([cols, rows], -1).astype(np.float64), shape)
    half = span_m / 2
    vertices = np.zeros((len(cells), 2, 4, 3), dtype=np.float32)
    for k, (ux, uy) in enumerate([(half, 0.0), (0.0, half)]):
        for corner, (side, dz) in enumerate([(-1, -half), (1, -half), (1, half), (-1, half)]):
            vertices[:, k, corner, 0] = centre[:, 0] + side * ux
            vertices[:, k, corner, 1] = centre[:, 1] + side * uy
            vertices[:, k, corner, 2] = height_m + dz
    quad = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    faces = (np.arange(len(cells))[:, None, None] * 8 + quad[None]).reshape(-1, 3)
    return vertices.reshape(-1, 3), faces.astype(np.int32)


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """A binary little-endian PLY triangle mesh (what Mitsuba and Blender read)."""
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(vertices)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n")
    records = np.zeros(len(faces), dtype=[("n", "u1"), ("index", "<i4", 3)])
    records["n"], records["index"] = 3, faces
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(np.ascontiguousarray(vertices, dtype="<f4").tobytes())
        f.write(records.tobytes())
