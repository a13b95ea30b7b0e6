"""Closed triangle meshes to voxel masks by ray parity along z (pure numpy).

Every grid column (x, y) is a ray along z; each triangle whose xy projection holds the column
is crossed once, at the z its plane has there. A voxel is inside when an odd number of
crossings lie below its centre: the crossings are written as toggles into a (z, y, x) array
and a cumulative sum along z, taken mod 2, fills between them; crossings above the grid are
counted in a plane past its top, so that a mesh the grid cuts is told from a hole. The ray
positions are moved by a fraction of a micrometre so that no ray passes exactly through a
vertex or an edge (which would count a crossing twice). A column with an odd number of
crossings passed through a hole in the mesh (the JHU and LLP26 surfaces have a few); it is left
empty and filled afterwards from its neighbours by a closing.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

RAY_JITTER_MM = 3.1e-4
CHUNK = 4_000_000  # (triangle, column) candidates tested at once: bounds the memory


def voxelise(
    vertices: np.ndarray,
    faces: np.ndarray,
    origin: np.ndarray,
    spacing: np.ndarray,
    shape: tuple[int, int, int],
) -> np.ndarray:
    """Inside mask (bool, (z, y, x)) of the closed mesh on the grid with voxel (0, 0, 0) centred
    at ``origin`` (x, y, z mm) and ``spacing`` (x, y, z mm)."""
    origin = np.asarray(origin, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    nz, ny, nx = shape
    # Vertices in voxel units, x and y jittered once for every ray.
    v = (np.asarray(vertices, dtype=np.float64) - origin) / spacing
    v[:, 0] -= RAY_JITTER_MM / spacing[0]
    v[:, 1] -= 0.7 * RAY_JITTER_MM / spacing[1]
    tri = v[faces]  # (M, 3 corners, xyz)
    lo = np.ceil(tri[:, :, :2].min(axis=1)).astype(np.int64)
    hi = np.floor(tri[:, :, :2].max(axis=1)).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [nx - 1, ny - 1])
    counts_x, counts_y = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
    keep = (counts_x > 0) & (counts_y > 0)
    tri, lo, counts_x, counts_y = tri[keep], lo[keep], counts_x[keep], counts_y[keep]
    # One plane past the top for the crossings above the grid: they set no voxel, but they
    # count in a column's total, whose parity tells a hole from a mesh the grid cuts.
    toggles = np.zeros((nz + 1, ny, nx), dtype=np.uint8)
    n_pixels = counts_x * counts_y
    # Candidate (triangle, column) pairs in chunks, so a large triangle cannot blow up memory.
    if len(tri):
        cumulative = np.cumsum(n_pixels)
        cuts = np.searchsorted(cumulative, np.arange(CHUNK, cumulative[-1], CHUNK))
        for a, b in itertools.pairwise([0, *np.unique(cuts).tolist(), len(tri)]):
            if b > a:
                _toggle(toggles, tri[a:b], lo[a:b], counts_x[a:b], counts_y[a:b], nz)
    parity = (np.cumsum(toggles, axis=0, dtype=np.uint8) & 1).astype(bool)
    inside = parity[:nz]
    # Columns through a hole: an odd number of crossings in all, above the grid included.
    leaky = parity[nz]
    if leaky.any():
        inside[:, leaky] = False
        inside = ndimage.binary_closing(inside, np.ones((3, 3, 3), bool), iterations=1)
    return inside


def _toggle(
    toggles: np.ndarray,
    tri: np.ndarray,
    lo: np.ndarray,
    counts_x: np.ndarray,
    counts_y: np.ndarray,
    nz: int,
) -> None:
    n_pixels = counts_x * counts_y
    owner = np.repeat(np.arange(len(tri)), n_pixels)
    local = np.arange(n_pixels.sum()) - np.repeat(np.cumsum(n_pixels) - n_pixels, n_pixels)
    px = lo[owner, 0] + local % counts_x[owner]
    py = lo[owner, 1] + local // counts_x[owner]
    t = tri[owner]
    a, b, c = t[:, 0], t[:, 1], t[:, 2]
    # Barycentric coordinates of the column (px, py) in the triangle's xy projection.
    det = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    ok = np.abs(det) > 1e-12
    det = np.where(ok, det, 1.0)
    l1 = ((b[:, 1] - c[:, 1]) * (px - c[:, 0]) + (c[:, 0] - b[:, 0]) * (py - c[:, 1])) / det
    l2 = ((c[:, 1] - a[:, 1]) * (px - c[:, 0]) + (a[:, 0] - c[:, 0]) * (py - c[:, 1])) / det
    l3 = 1.0 - l1 - l2
    hit = ok & (l1 >= 0) & (l2 >= 0) & (l3 >= 0)
    z = l1 * a[:, 2] + l2 * b[:, 2] + l3 * c[:, 2]
    # The first voxel centre above the crossing toggles; a crossing above the grid toggles the
    # extra plane past its top (`voxelise`).
    k = np.clip(np.ceil(z[hit]).astype(np.int64), 0, nz)
    np.add.at(toggles, (k, py[hit], px[hit]), 1)


def mesh_box(
    vertices: np.ndarray,
    origin: np.ndarray,
    spacing: np.ndarray,
    shape: tuple[int, int, int],
    margin: int = 2,
) -> tuple[slice, slice, slice] | None:
    """The (z, y, x) slices of the grid around the mesh's bounding box, or None outside it."""
    lo = np.floor((vertices.min(axis=0) - origin) / spacing).astype(int)[::-1] - margin
    hi = np.ceil((vertices.max(axis=0) - origin) / spacing).astype(int)[::-1] + margin + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]
