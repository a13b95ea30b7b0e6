"""Subject phantoms: CT phantoms built from real subjects' bone shapes (issue 18).

:func:`generate_subject_phantom` poses a skeleton of real bones (:mod:`.skeleton`, shapes from
:mod:`.shapes`), builds the body around it as a tissue map (:mod:`.body`) over a field of view
(a region of one or both legs, cut anywhere), and gives the tissue map, the bone labels and the
geometry (landmarks). The CT image is drawn from the tissue map by :mod:`model.training.synthesis`:
afresh at every training step, or once (`SubjectPhantom.image`) for evaluation. Knows nothing
of DICOM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.labels import Bone
from model.phantom.subjects.body import (
    COARSE,
    Grid,
    Habitus,
    _upsample,
    body_depth,
    lumbar_vertebrae,
    open_joint_spaces,
    paint_bone,
    paint_ellipsoid,
    paint_pelvic_organs,
    paint_soft_tissue,
    paint_tube,
    paint_vessels,
)
from model.phantom.subjects.skeleton import SIDES, Skeleton, build_skeleton
from model.training.synthesis import Tissue, nominal_lut, synthesise
from model.volume_io import Volume

SUBJECT_PHANTOM_VERSION = "1.2"
SPACING_MM = 0.8
REGIONS = ("pelvis", "hip", "thigh", "knee", "leg", "ankle", "long")
MAX_VOXELS = 90_000_000


@dataclass
class SubjectPhantom:
    """Tissue map and bone labels (uint8, (z, y, x)) on one 0.8 mm LPS grid, and geometry."""

    tissues: Volume
    labels: Volume
    geometry: dict

    def image(self, rng: np.random.Generator) -> Volume:
        """A CT image of the phantom drawn by the synthesis chain (int16 HU)."""
        hu = synthesise(self.tissues.array, rng)
        return self.tissues.with_array(hu.astype(np.int16))

    def nominal_image(self) -> np.ndarray:
        """Each tissue at the middle of its HU range, no texture or noise (int16)."""
        return nominal_lut()[self.tissues.array].astype(np.int16)


def generate_subject_phantom(
    seed: int, region: str | None = None, subject: int | None = None
) -> SubjectPhantom:
    """The subject phantom of ``seed``: bit-identical for the same arguments. ``subject``: an
    LLP26 subject's own shape (held-out subjects for evaluation); None draws shapes."""
    rng = np.random.default_rng([seed, 18])
    skeleton = build_skeleton(rng, subject=subject)
    habitus = Habitus.draw(rng)
    region = region or str(rng.choice(REGIONS, p=[0.2, 0.15, 0.15, 0.15, 0.1, 0.15, 0.1]))
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    # The body outline, coarse, over the slices in view; then the field of view inside it.
    z_lo, z_hi, side = _field_of_view(skeleton, region, rng)
    lo, hi = skeleton.lo - 150.0, skeleton.hi + 150.0
    lo[2], hi[2] = z_lo - 2 * COARSE * SPACING_MM, z_hi + 2 * COARSE * SPACING_MM
    coarse_grid = Grid(
        tuple(int(n) for n in (np.ceil((hi - lo) / SPACING_MM)[::-1] // COARSE * COARSE + 1)),  # type: ignore[arg-type]
        lo,
        SPACING_MM,
    )
    depth = body_depth(skeleton, habitus, coarse_grid, rng)
    grid = _fov_grid(coarse_grid, depth, z_lo, z_hi, side, skeleton, rng)
    # The coarse depth field cut to the grid, then brought to 0.8 mm.
    offset = np.round((grid.origin - coarse_grid.origin) / SPACING_MM).astype(int)[::-1]
    c_lo = offset // COARSE
    c_hi = (offset + np.array(grid.shape) - 1) // COARSE + 2
    sub = depth[tuple(slice(a, b) for a, b in zip(c_lo, c_hi, strict=True))]
    shift = offset - c_lo * COARSE
    fine = _upsample(sub, tuple(int(n) for n in np.array(grid.shape) + shift))  # type: ignore[arg-type]
    fine = fine[shift[0] :, shift[1] :, shift[2] :][
        : grid.shape[0], : grid.shape[1], : grid.shape[2]
    ]
    tissues = np.zeros(grid.shape, np.uint8)
    labels = np.zeros(grid.shape, np.uint8)
    muscle = paint_soft_tissue(tissues, fine, habitus, rng)
    del fine
    paint_vessels(tissues, grid, skeleton, muscle, rng)
    if region in ("pelvis", "hip", "long"):
        paint_pelvic_organs(tissues, grid, skeleton, habitus, muscle, rng)
        for centre, radii in lumbar_vertebrae(skeleton, rng):
            paint_ellipsoid(tissues, grid, centre, radii, Tissue.CORTEX)
            paint_ellipsoid(tissues, grid, centre, radii - 1.2, Tissue.CANCELLOUS)
            spine = centre + np.array([0.0, radii[1] + 22.0, 0.0])
            paint_ellipsoid(
                tissues, grid, spine, np.array([28.0, 20.0, radii[2] * 0.9]), Tissue.CORTEX
            )
        if rng.random() < 0.3:
            _paint_arms(tissues, grid, skeleton, habitus, rng)
    masses = []
    if rng.random() < 0.2:
        masses.append(_paint_mass(tissues, grid, skeleton, muscle, rng))
    del muscle
    _paint_table(tissues, grid, habitus, rng)
    cortex_scale = float(rng.uniform(0.6, 0.8)) if rng.random() < 0.2 else 1.0
    boxes = {}
    for part in skeleton.parts:
        if part.kind == "long":
            base = {"femur": 5.5, "tibia": 4.5, "fibula": 2.0}[part.name.split("_")[0]]
            cortex = (
                float(rng.uniform(0.6, 1.4)),
                base * float(rng.uniform(0.75, 1.3)) * cortex_scale,
            )
        elif part.kind == "flat":
            cortex = (float(rng.uniform(0.8, 2.0)) * cortex_scale, 0.0)
        else:
            cortex = (float(rng.uniform(0.6, 1.4)), 0.0)
        placed = paint_bone(
            tissues, labels, grid, part, cortex, habitus.young and part.kind == "long"
        )
        if placed is not None:
            boxes[part.name] = placed
    open_joint_spaces(tissues, labels, grid, boxes, rng)
    implant = (
        _paint_implant(tissues, labels, grid, skeleton, boxes, rng) if rng.random() < 0.15 else None
    )
    counts = np.bincount(labels.ravel(), minlength=len(Bone) + 1)
    geometry = {
        "seed": int(seed),
        "subject_phantom_version": SUBJECT_PHANTOM_VERSION,
        "region": region,
        "side": side,
        "spacing": [SPACING_MM] * 3,
        "shape_zyx": list(grid.shape),
        "origin": [float(v) for v in grid.origin],
        "bones_present": [Bone(i).name.lower() for i in range(1, len(Bone) + 1) if counts[i]],
        "implant": implant,
        "masses": masses,
        "habitus": vars(habitus),
        "landmarks": {k: [round(float(x), 2) for x in v] for k, v in skeleton.landmarks.items()},
        **skeleton.geometry,
    }
    origin_x, origin_y, origin_z = (float(v) for v in grid.origin)
    origin = (origin_x, origin_y, origin_z)
    spacing = (SPACING_MM, SPACING_MM, SPACING_MM)
    return SubjectPhantom(
        Volume(tissues, spacing, origin), Volume(labels, spacing, origin), geometry
    )


def _field_of_view(
    skeleton: Skeleton, region: str, rng: np.random.Generator
) -> tuple[float, float, str | None]:
    """z range (mm) of the scan and the side it is centred on (None: both legs)."""
    lm = skeleton.landmarks
    side = str(rng.choice(SIDES))
    hip = float(lm[f"hip_{side}"][2])
    knee = float(lm[f"knee_{side}"][2])
    ankle = float(lm[f"ankle_{side}"][2])
    crest = float(skeleton.hi[2])
    u = rng.uniform
    if region == "pelvis":
        return hip - u(60, 200), crest + u(-20, 80), None
    if region == "hip":
        return hip - u(50, 110), hip + u(50, 110), side
    if region in ("thigh", "leg"):  # a stretch of the shaft between two joints
        top, bottom, most = (hip, knee, 180) if region == "thigh" else (knee, ankle, 160)
        centre, half = u(bottom + 80, top - 80), u(60, most)
        return centre - half, centre + half, side if rng.random() < 0.6 else None
    if region == "knee":
        return knee - u(50, 130), knee + u(50, 130), side if rng.random() < 0.6 else None
    if region == "ankle":
        return ankle - u(70, 100), ankle + u(40, 140), side if rng.random() < 0.5 else None
    start = u(ankle - 80, hip)
    return start, start + u(250, 420), None


def _fov_grid(
    coarse: Grid,
    depth: np.ndarray,
    z_lo: float,
    z_hi: float,
    side: str | None,
    skeleton: Skeleton,
    rng: np.random.Generator,
) -> Grid:
    """The 0.8 mm grid of the scan: the body's extent in those slices plus a margin of air, or
    for one side a box around that leg (a crop, as the real extremity scans are)."""
    z = coarse.axis(2, COARSE)
    rows = (z >= z_lo) & (z <= z_hi)
    body = depth[rows] > 0
    ys, xs = np.nonzero(body.any(axis=0))
    y_axis, x_axis = coarse.axis(1, COARSE), coarse.axis(0, COARSE)
    margin = rng.uniform(5, 40, size=2)
    lo = np.array([x_axis[xs.min()] - margin[0], y_axis[ys.min()] - margin[1], z_lo])
    hi = np.array([x_axis[xs.max()] + margin[0], y_axis[ys.max()] + 40.0, z_hi])
    if side is not None:
        # Around that leg where it crosses the slices in view (the leg's own centroid can lie
        # far off when the hip is flexed, and a hip crop then missed the hip).
        lm = skeleton.landmarks
        path = np.array([lm[f"{joint}_{side}"] for joint in ("ankle", "knee", "hip")])
        middle = float(np.clip((z_lo + z_hi) / 2, path[0, 2], path[-1, 2]))
        centre = np.array([np.interp(middle, path[:, 2], path[:, i]) for i in range(3)])
        half = rng.uniform(60, 130, size=2)
        lo[:2] = np.maximum(lo[:2], centre[:2] - half)
        hi[:2] = np.minimum(hi[:2], centre[:2] + half)
    shape = np.ceil((hi - lo) / SPACING_MM).astype(int)[::-1]
    while np.prod(shape) > MAX_VOXELS:
        shape[0] = int(shape[0] * 0.85)
    return Grid(tuple(int(n) for n in shape), lo, SPACING_MM)  # type: ignore[arg-type]


def _paint_arms(
    tissues: np.ndarray, grid: Grid, skeleton: Skeleton, habitus: Habitus, rng: np.random.Generator
) -> None:
    """Arms lying beside the pelvis: soft tissue around a humerus or forearm bones (not ours)."""
    hips = [p.mesh for p in skeleton.parts if p.name.startswith("hip_bone")]
    lo, hi = np.min([m.lo for m in hips], axis=0), np.max([m.hi for m in hips], axis=0)
    for sign in (-1.0, 1.0):
        x = (lo[0] + hi[0]) / 2 + sign * (
            (hi[0] - lo[0]) / 2 + habitus.pelvis_margin_mm + rng.uniform(30, 70)
        )
        y = (lo[1] + hi[1]) / 2 + rng.uniform(-30, 30)
        z0, z1 = grid.origin[2] - 10, grid.origin[2] + grid.shape[0] * grid.spacing + 10
        path = [np.array([x, y, z0]), np.array([x + rng.uniform(-20, 20), y, z1])]
        paint_tube(tissues, grid, path, float(rng.uniform(30, 45)), Tissue.FAT)
        paint_tube(tissues, grid, path, float(rng.uniform(22, 28)), Tissue.MUSCLE)
        for offset in (
            ([0.0, 0.0, 0.0], [14.0 * sign, 4.0, 0.0]) if rng.random() < 0.5 else ([0.0, 0.0, 0.0],)
        ):
            bone = [p + np.array(offset) for p in path]
            radius = float(rng.uniform(7, 11))
            paint_tube(tissues, grid, bone, radius, Tissue.CORTEX)
            paint_tube(tissues, grid, bone, radius - 2.5, Tissue.MARROW)


def _paint_mass(
    tissues: np.ndarray,
    grid: Grid,
    skeleton: Skeleton,
    muscle: np.ndarray,
    rng: np.random.Generator,
) -> dict:
    """A soft-tissue mass in muscle near a long bone, sometimes with a necrotic core."""
    longs = [p for p in skeleton.parts if p.kind == "long" and p.axis is not None]
    part = longs[int(rng.integers(len(longs)))]
    top, bottom = part.axis  # type: ignore[misc]
    point = top + rng.uniform(0.2, 0.8) * (bottom - top)
    direction = rng.normal(size=3)
    direction[2] = 0.0
    direction /= np.linalg.norm(direction)
    radii = rng.uniform(15, 45, 3)
    centre = point + direction * (radii[:2].mean() + rng.uniform(10, 30))
    paint_ellipsoid(tissues, grid, centre, radii, Tissue.MASS, muscle)
    if rng.random() < 0.4:
        paint_ellipsoid(tissues, grid, centre, radii * 0.5, Tissue.NECROSIS, muscle)
    return {"near": part.name, "centre": [round(float(v), 1) for v in centre]}


def _paint_table(
    tissues: np.ndarray, grid: Grid, habitus: Habitus, rng: np.random.Generator
) -> None:
    """The table under the body (above it for a prone patient): a curved carbon-fibre shell
    around foam, with a foam cushion and now and then a blanket on the body."""
    body = tissues > 0
    rows = np.nonzero(body.any(axis=(0, 2)))[0]
    if rows.size == 0:
        return
    y = grid.axis(1)[:, None]
    x = grid.axis(0)[None, :]
    cx = float(grid.axis(0)[np.nonzero(body.any(axis=(0, 1)))[0]].mean())
    curve = float(rng.uniform(0.0, 3e-4)) * (x - cx) ** 2
    cushion = float(rng.uniform(0, 25))
    if habitus.prone:
        top = grid.axis(1)[rows.min()] - cushion
        d = top - y - curve  # depth beyond the table's surface, away from the body
    else:
        top = grid.axis(1)[rows.max()] + cushion
        d = y - top - curve
    shell = float(rng.uniform(1.5, 3.0))
    layer = np.zeros(d.shape, np.uint8)
    layer[(d > -cushion) & (d <= 0)] = Tissue.FOAM
    layer[(d > 0) & (d <= shell)] = Tissue.TABLE
    layer[(d > shell) & (d <= 40.0 - shell)] = Tissue.FOAM
    layer[(d > 40.0 - shell) & (d <= 40.0)] = Tissue.TABLE
    layer[:, np.abs(x[0] - cx) > 230.0] = 0
    air = tissues == Tissue.AIR
    np.copyto(tissues, np.broadcast_to(layer[None], tissues.shape), where=air & (layer[None] > 0))
    if rng.random() < 0.2:  # a blanket a little off the skin, on the side away from the table
        near = ndimage.binary_dilation(body[::2, ::2, ::2], iterations=int(rng.integers(2, 5)))
        near = np.repeat(np.repeat(np.repeat(near, 2, 0), 2, 1), 2, 2)[
            : grid.shape[0], : grid.shape[1], : grid.shape[2]
        ]
        shell_mask = near & (tissues == Tissue.AIR)
        shell_mask &= ~np.roll(near, 2, axis=1) if not habitus.prone else ~np.roll(near, -2, axis=1)
        tissues[shell_mask] = Tissue.BLANKET


def _paint_implant(
    tissues: np.ndarray,
    labels: np.ndarray,
    grid: Grid,
    skeleton: Skeleton,
    boxes: dict[str, tuple[tuple[slice, ...], np.ndarray]],
    rng: np.random.Generator,
) -> dict | None:
    """One metal implant in a bone in view: a hip or knee prosthesis, a nail, or a plate with
    screws. Metal voxels are labelled 0; a prosthesis' ball replaces the femoral head."""
    side = str(rng.choice(SIDES))
    lm = skeleton.landmarks
    kind = str(rng.choice(["hip", "knee", "nail", "plate"]))
    femur = next(p for p in skeleton.parts if p.name == f"femur_{side}")
    tibia = next(p for p in skeleton.parts if p.name == f"tibia_{side}")
    metal = np.zeros(grid.shape, np.uint8)
    if kind == "hip":
        head = lm[f"hip_{side}"]
        radius = float(lm[f"femoral_head_radius_{side}"][0])
        top, bottom = femur.axis  # type: ignore[misc]
        neck_end = top + 0.15 * (bottom - top)
        # The head is gone: what the ball does not fill is soft tissue; then ball and stem.
        placed = paint_ellipsoid(
            np.zeros(grid.shape, np.uint8), grid, head, np.full(3, radius + 2.0), Tissue.METAL
        )
        if placed is not None:
            inside, box = placed
            region = inside & (labels[box] == 1)
            labels[box][region] = 0
            tissues[box][region] = Tissue.FLUID
        paint_ellipsoid(metal, grid, head, np.full(3, float(rng.uniform(14, 18))), Tissue.METAL)
        paint_tube(
            metal,
            grid,
            [head, neck_end, top + 0.35 * (bottom - top)],
            float(rng.uniform(5, 8)),
            Tissue.METAL,
        )
    elif kind == "knee":
        knee = lm[f"knee_{side}"]
        if f"femur_{side}" in boxes:
            box, inside = boxes[f"femur_{side}"]
            z = grid.axis(2)[box[0]][:, None, None]
            shell = inside & ~ndimage.binary_erosion(inside, iterations=int(rng.integers(5, 9)))
            shell &= np.broadcast_to(z < knee[2] + 25.0, shell.shape)
            metal[box][shell] = Tissue.METAL
        tray = knee + np.array([0.0, 0.0, -6.0])
        paint_ellipsoid(metal, grid, tray, np.array([38.0, 28.0, 2.5]), Tissue.METAL)
        paint_tube(metal, grid, [tray, tray + np.array([0.0, 0.0, -45.0])], 6.0, Tissue.METAL)
    else:
        bone = femur if rng.random() < 0.6 else tibia
        top, bottom = bone.axis  # type: ignore[misc]
        a, b = rng.uniform(0.05, 0.3), rng.uniform(0.7, 0.95)
        if kind == "nail":
            paint_tube(
                metal,
                grid,
                [top + a * (bottom - top), top + b * (bottom - top)],
                float(rng.uniform(4.5, 6.0)),
                Tissue.METAL,
            )
        else:
            a, b = rng.uniform(0.3, 0.5), rng.uniform(0.55, 0.8)
            outward = np.array([1.0 if side == "left" else -1.0, 0.0, 0.0]) * 17.0
            plate = [top + a * (bottom - top) + outward, top + b * (bottom - top) + outward]
            paint_tube(metal, grid, plate, 2.5, Tissue.METAL)
            for t in np.linspace(0.0, 1.0, int(rng.integers(4, 9))):
                screw = plate[0] + t * (plate[1] - plate[0])
                paint_tube(metal, grid, [screw, screw - 2.2 * outward], 2.0, Tissue.METAL)
    where = metal > 0
    tissues[where] = Tissue.METAL
    labels[where] = 0
    return {"kind": kind, "side": side}
