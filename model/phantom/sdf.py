"""A small signed-distance toolkit: primitives and combinators evaluated on axis-aligned grids.

Every shape is a 1-Lipschitz-ish function of position, negative inside, in millimetres. That one
property carries the phantom: partial-volume coverage is ``clip(0.5 - d / voxel)``, labels are the
crisp test ``d < 0``, cortical shells are ``d + thickness < 0`` and joint spaces are guaranteed by
:class:`Clear` (``max(d, gap - d_other)``), which keeps a bone at least ``gap`` from its neighbour.

Values are truncated at :data:`MARGIN` on the outside. That lets each node be evaluated only inside
its own bounding box (padded by ``MARGIN``) and filled with ``MARGIN`` elsewhere, which is what
makes a 512x512x1400 phantom affordable. Truncation is harmless as long as no operation needs
outside distances beyond ``MARGIN`` (gaps, smoothing radii and shell offsets are all smaller) and
no subtraction needs inside depths beyond ``MARGIN`` (cortical thickness stays below it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

MARGIN = 8.0
"""Truncation distance (mm) of every evaluated field, and the padding of bounding boxes."""

Vec = np.ndarray
ArrayF = np.ndarray


def vec(*xyz: float) -> Vec:
    """A float64 3-vector (x, y, z) in LPS millimetres."""
    return np.asarray(xyz, dtype=np.float64)


def unit(v: Vec) -> Vec:
    return v / np.linalg.norm(v)


def frame(axis_z: Vec, hint_x: Vec) -> np.ndarray:
    """Rotation whose rows are local x, y, z axes: z along ``axis_z``, x as close to ``hint_x``.

    Local coordinates are ``frame @ (p - centre)``; rows are orthonormal world directions.
    """
    ez = unit(axis_z)
    ex = unit(hint_x - np.dot(hint_x, ez) * ez)
    ey = np.cross(ez, ex)
    return np.stack([ex, ey, ez])


def rotation(axis: Vec, degrees: float) -> np.ndarray:
    """Rodrigues rotation matrix about ``axis`` (right-handed) by ``degrees``."""
    a = unit(axis)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


@dataclass(frozen=True)
class Block:
    """An axis-aligned grid of voxel centres given by sorted 1-D coordinate vectors (mm, float32).

    Fields on a block are numpy arrays of shape (nz, ny, nx), the project's (z, y, x) order.
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z), len(self.y), len(self.x))

    def axes(self) -> tuple[ArrayF, ArrayF, ArrayF]:
        """Broadcastable coordinate arrays X (1,1,nx), Y (1,ny,1), Z (nz,1,1)."""
        return self.x[None, None, :], self.y[None, :, None], self.z[:, None, None]

    def crop(self, lo: Vec, hi: Vec) -> tuple[Block, tuple[slice, slice, slice]] | None:
        """The part inside the box [lo, hi] and its slices into this block (None if empty)."""
        idx = []
        for coords, a, b in zip((self.z, self.y, self.x), lo[::-1], hi[::-1], strict=True):
            i0 = int(np.searchsorted(coords, a, side="left"))
            i1 = int(np.searchsorted(coords, b, side="right"))
            if i1 <= i0:
                return None
            idx.append(slice(i0, i1))
        sz, sy, sx = idx
        return Block(self.x[sx], self.y[sy], self.z[sz]), (sz, sy, sx)


def _local(b: Block, centre: Vec, rot: np.ndarray | None) -> tuple[ArrayF, ArrayF, ArrayF]:
    """Block coordinates in a primitive's local frame (broadcast arrays, full only if rotated)."""
    X, Y, Z = b.axes()
    c = centre.astype(np.float32)
    dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
    if rot is None:
        return dx, dy, dz
    r = rot.astype(np.float32)
    return tuple(r[i, 0] * dx + r[i, 1] * dy + r[i, 2] * dz for i in range(3))


def _rotated_extent(rot: np.ndarray | None, half: Vec) -> Vec:
    """World axis-aligned half extent of a local box of half sizes ``half``."""
    if rot is None:
        return np.abs(half)
    return np.abs(rot.T) @ np.abs(half)


class Sdf:
    """A shape: ``field`` on a block, with a bounding box ``lo``..``hi`` of its inside (mm, xyz)."""

    lo: Vec
    hi: Vec

    def field(self, b: Block, margin: float) -> ArrayF:
        """Raw signed distance on ``b`` (may be broadcastable), exact at least up to ``margin``."""
        raise NotImplementedError

    def eval(self, b: Block, margin: float = MARGIN) -> ArrayF:
        """Signed distance truncated at ``margin``, computed only near the bounding box."""
        out = np.full(b.shape, margin, np.float32)
        cropped = b.crop(self.lo - margin, self.hi + margin)
        if cropped is not None:
            sub, sl = cropped
            out[sl] = np.minimum(self.field(sub, margin), np.float32(margin))
        return out

    def intersects(self, lo: Vec, hi: Vec, margin: float = MARGIN) -> bool:
        return bool(np.all(self.lo - margin <= hi) and np.all(self.hi + margin >= lo))


class Sphere(Sdf):
    def __init__(self, centre: Vec, radius: float) -> None:
        self.c, self.r = centre, float(radius)
        self.lo, self.hi = centre - radius, centre + radius

    def field(self, b: Block, margin: float) -> ArrayF:
        dx, dy, dz = _local(b, self.c, None)
        return np.sqrt(dx * dx + dy * dy + dz * dz) - np.float32(self.r)


class Ellipsoid(Sdf):
    """Ellipsoid with radii along the rows of ``rot`` (Quilez's near-exact approximation)."""

    def __init__(self, centre: Vec, radii: Vec, rot: np.ndarray | None = None) -> None:
        self.c, self.radii, self.rot = centre, np.asarray(radii, np.float64), rot
        ext = _rotated_extent(rot, self.radii)
        self.lo, self.hi = centre - ext, centre + ext

    def field(self, b: Block, margin: float) -> ArrayF:
        q = _local(b, self.c, self.rot)
        r = self.radii.astype(np.float32)
        k0 = np.sqrt(sum((qi / ri) ** 2 for qi, ri in zip(q, r, strict=True)))
        k1 = np.sqrt(sum((qi / (ri * ri)) ** 2 for qi, ri in zip(q, r, strict=True)))
        return k0 * (k0 - 1.0) / np.maximum(k1, np.float32(1e-6))


class Capsule(Sdf):
    """Segment a-b swept by a sphere whose radius varies linearly from ``ra`` to ``rb``."""

    def __init__(self, a: Vec, b: Vec, ra: float, rb: float | None = None) -> None:
        rb = ra if rb is None else rb
        self.a, self.ra, self.rb = a, float(ra), float(rb)
        self.axis = b - a
        self.length = float(np.linalg.norm(self.axis))
        self.u = self.axis / self.length
        r = max(ra, rb)
        self.lo, self.hi = np.minimum(a, b) - r, np.maximum(a, b) + r

    def field(self, b: Block, margin: float) -> ArrayF:
        dx, dy, dz = _local(b, self.a, None)
        u = self.u.astype(np.float32)
        t = np.clip((dx * u[0] + dy * u[1] + dz * u[2]) / np.float32(self.length), 0.0, 1.0)
        t = t.astype(np.float32)
        s = t * np.float32(self.length)
        px, py, pz = dx - s * u[0], dy - s * u[1], dz - s * u[2]
        radius = np.float32(self.ra) + t * np.float32(self.rb - self.ra)
        return np.sqrt(px * px + py * py + pz * pz) - radius


class RoundBox(Sdf):
    """Box of half sizes ``half`` along the rows of ``rot``, edges rounded by ``rounding``."""

    def __init__(
        self, centre: Vec, half: Vec, rot: np.ndarray | None = None, rounding: float = 0.0
    ) -> None:
        self.c, self.half, self.rot, self.rounding = centre, np.asarray(half), rot, float(rounding)
        ext = _rotated_extent(rot, self.half)
        self.lo, self.hi = centre - ext, centre + ext

    def field(self, b: Block, margin: float) -> ArrayF:
        q = _local(b, self.c, self.rot)
        inner = (self.half - self.rounding).astype(np.float32)
        d = [np.abs(qi) - hi for qi, hi in zip(q, inner, strict=True)]
        outside = np.sqrt(sum(np.maximum(di, 0.0) ** 2 for di in d))
        inside = np.minimum(np.maximum(np.maximum(d[0], d[1]), d[2]), 0.0)
        return outside + inside - np.float32(self.rounding)


class Cylinder(Sdf):
    """Capped cylinder around the local z axis (third row of ``rot``)."""

    def __init__(self, centre: Vec, radius: float, half_height: float, rot: np.ndarray) -> None:
        self.c, self.r, self.h, self.rot = centre, float(radius), float(half_height), rot
        ext = _rotated_extent(rot, vec(radius, radius, half_height))
        self.lo, self.hi = centre - ext, centre + ext

    def field(self, b: Block, margin: float) -> ArrayF:
        qx, qy, qz = _local(b, self.c, self.rot)
        d0 = np.sqrt(qx * qx + qy * qy) - np.float32(self.r)
        d1 = np.abs(qz) - np.float32(self.h)
        outside = np.sqrt(np.maximum(d0, 0.0) ** 2 + np.maximum(d1, 0.0) ** 2)
        return outside + np.minimum(np.maximum(d0, d1), 0.0)


class HalfSpace(Sdf):
    """Points with ``dot(p - point, normal) < 0``; unbounded, so only inside Intersect/Subtract."""

    def __init__(self, point: Vec, normal: Vec) -> None:
        self.p, self.n = point, unit(normal)
        self.lo, self.hi = np.full(3, -np.inf), np.full(3, np.inf)

    def field(self, b: Block, margin: float) -> ArrayF:
        dx, dy, dz = _local(b, self.p, None)
        n = self.n.astype(np.float32)
        return dx * n[0] + dy * n[1] + dz * n[2]


def _smin(a: ArrayF, b: ArrayF, k: float) -> ArrayF:
    """Polynomial smooth minimum (gradient is a convex combination, so it stays 1-Lipschitz)."""
    h = np.clip(0.5 + 0.5 * (b - a) / np.float32(k), 0.0, 1.0)
    return b + h * (a - b) - np.float32(k) * h * (1.0 - h)


class Union(Sdf):
    """Union of shapes, blended over ``smooth`` mm when ``smooth`` > 0 (fillets between parts).

    Children are evaluated with a margin of at least twice the blend radius, and a truncated
    (far) child is never blended: blending two truncated values would eat into the margin and,
    repeated over many children, turn far-away space into inside.
    """

    def __init__(self, parts: Sequence[Sdf], smooth: float = 0.0) -> None:
        self.parts, self.smooth = list(parts), float(smooth)
        self.lo = np.min([p.lo for p in self.parts], axis=0)
        self.hi = np.max([p.hi for p in self.parts], axis=0)

    def field(self, b: Block, margin: float) -> ArrayF:
        m = max(margin, 2 * self.smooth)
        far = np.float32(m)
        acc = np.full(b.shape, far, np.float32)
        for part in self.parts:  # one child at a time: bounded memory for big unions
            if not part.intersects(*_bounds(b), m):
                continue
            f = part.eval(b, m)
            if self.smooth == 0:
                np.minimum(acc, f, out=acc)
            else:
                acc = np.where(f >= far, acc, np.where(acc >= far, f, _smin(acc, f, self.smooth)))
        return acc


class Intersect(Sdf):
    def __init__(self, *parts: Sdf) -> None:
        self.parts = parts
        self.lo = np.max([p.lo for p in parts], axis=0)
        self.hi = np.min([p.hi for p in parts], axis=0)

    def field(self, b: Block, margin: float) -> ArrayF:
        return reduce(np.maximum, (p.eval(b, margin) for p in self.parts))


class Subtract(Sdf):
    """``base`` minus ``cut``."""

    def __init__(self, base: Sdf, cut: Sdf) -> None:
        self.base, self.cut = base, cut
        self.lo, self.hi = base.lo, base.hi

    def field(self, b: Block, margin: float) -> ArrayF:
        return np.maximum(self.base.eval(b, margin), -self.cut.eval(b, margin))


class Shell(Sdf):
    """A shell of half thickness ``half`` around the surface of ``base`` (plates, cups)."""

    def __init__(self, base: Sdf, half: float) -> None:
        self.base, self.half = base, float(half)
        self.lo, self.hi = base.lo - half, base.hi + half

    def field(self, b: Block, margin: float) -> ArrayF:
        return np.abs(self.base.eval(b, margin + self.half)) - np.float32(self.half)


class Clear(Sdf):
    """``base`` with everything closer than ``gap`` to any of ``others`` removed: a joint space.

    Because the others' fields are (close to) 1-Lipschitz lower bounds of distance, two voxel
    centres closer than ``gap`` can never be inside ``base`` and an other shape at the same time.
    """

    def __init__(self, base: Sdf, others: Sequence[Sdf], gap: float) -> None:
        if gap >= MARGIN:
            raise ValueError("gap must stay below MARGIN")
        self.base, self.others, self.gap = base, list(others), float(gap)
        self.lo, self.hi = base.lo, base.hi

    def field(self, b: Block, margin: float) -> ArrayF:
        d = self.base.eval(b, margin)
        near = [o for o in self.others if o.intersects(*_bounds(b))]
        if not near:
            return d
        other = reduce(np.minimum, (o.eval(b) for o in near))
        return np.maximum(d, np.float32(self.gap) - other)


def _bounds(b: Block) -> tuple[Vec, Vec]:
    lo = np.array([b.x[0], b.y[0], b.z[0]], np.float64)
    hi = np.array([b.x[-1], b.y[-1], b.z[-1]], np.float64)
    return lo, hi
