"""Synthetic lower-extremity CT phantom: HU volume, bone labels and ground-truth geometry.

There is no public lower-extremity CT with these bone labels, so the model is trained on this
phantom. Bones are signed-distance shapes (:mod:`.sdf`) placed on a kinematic skeleton sampled
per seed (:mod:`.anatomy`) and voxelised with partial volume, blur, correlated noise and the odd
metal implant with streaks (:mod:`.render`). Knows nothing of DICOM.

Coordinates are LPS (DICOM patient): +x patient left, +y posterior, +z superior; direction is
identity, so numpy slice 0 is the most inferior slice, rows run anterior -> posterior (the table
is at large y) and columns run right -> left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.labels import Bone
from model.phantom.anatomy import Anatomy, build_anatomy
from model.phantom.render import Grid, Renderer, sample_appearance
from model.volume_io import Volume, write_volume

PHANTOM_VERSION: str = "1.0"
"""Bump whenever the generated anatomy or appearance changes (cached datasets key on it)."""

FULL_REGIONS = ("whole_legs", "torso", "lower_legs")
SMALL_REGIONS = ("hip", "knee", "ankle")
SMALL_EXTENT_MM = 128.0
SMALL_MAX_VOXELS = 160


@dataclass
class Phantom:
    """One synthetic CT: ``image`` (int16 HU) and ``labels`` (uint8 Bone values) on one grid."""

    image: Volume
    labels: Volume
    geometry: dict
    slice_thickness_mm: float


def generate_phantom(
    seed: int,
    size: str = "full",
    *,
    spacing: tuple[float, float, float] | None = None,
    region: str | None = None,
    shape_xy: tuple[int, int] | None = None,
) -> Phantom:
    """Generate the phantom of ``seed``; the same arguments always give bit-identical arrays.

    ``size="full"``: an axial scan of ``shape_xy`` = (nx, ny) voxels (default 512x512) over the
    region's z extent ("whole_legs", "torso" or "lower_legs"). ``size="small"``: a cube of about
    128 mm (at most 160 voxels a side) around one joint ("hip", "knee" or "ankle").
    ``spacing`` (x, y, z) mm and ``region`` are drawn from the seed when None. The patient
    (anatomy) depends on the seed only, not on the region or spacing asked for.
    """
    if size not in ("full", "small"):
        raise ValueError(f"size must be 'full' or 'small', got {size!r}")
    regions = FULL_REGIONS if size == "full" else SMALL_REGIONS
    if region is not None and region not in regions:
        raise ValueError(f"region for size={size!r} must be one of {regions}, got {region!r}")
    scan_rng = np.random.default_rng([seed, 1])
    anatomy = build_anatomy(np.random.default_rng([seed, 0]))
    if size == "full":
        drawn_region = str(scan_rng.choice(regions, p=[0.7, 0.15, 0.15]))
        drawn_spacing = (
            *(2 * [float(scan_rng.uniform(0.6, 1.0))]),
            float(scan_rng.uniform(0.5, 1.5)),
        )
    else:
        drawn_region = str(scan_rng.choice(regions))
        drawn_spacing = tuple(3 * [float(scan_rng.uniform(0.8, 1.0))])
    region = region or drawn_region
    sp = tuple(float(v) for v in (spacing or np.round(drawn_spacing, 3)))
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {spacing!r}")
    thickness = max(sp[2], round(sp[2] * float(scan_rng.choice([1.0, 1.0, 1.25, 1.5, 2.0])), 3))
    if size == "full":
        grid = _full_grid(anatomy, region, sp, shape_xy or (512, 512), scan_rng)
    else:
        grid = _small_grid(anatomy, region, sp, scan_rng)
    app = sample_appearance(np.random.default_rng([seed, 2]), seed, thickness)
    hu, labels = Renderer(anatomy, grid, app).run()
    image = Volume(hu, grid.spacing, grid.origin)
    counts = sum(  # in slabs: bincount casts to int64, 8x the memory of the labels
        (
            np.bincount(labels[z : z + 64].ravel(), minlength=len(Bone) + 1)
            for z in range(0, labels.shape[0], 64)
        ),
        start=np.zeros(len(Bone) + 1, dtype=np.int64),
    )
    lo, hi = np.asarray(grid.origin), np.asarray(grid.origin) + np.asarray(sp) * grid.shape[::-1]
    in_view = sorted(
        {
            _base_name(p.name)
            for p in anatomy.parts
            if p.label == 0 and not p.metal and p.sdf.intersects(lo, hi)
        }
    )
    geometry = {
        "seed": int(seed),
        "phantom_version": PHANTOM_VERSION,
        "size": size,
        "region": region,
        "spacing": list(sp),
        "shape_zyx": list(grid.shape),
        "origin": list(grid.origin),
        "slice_thickness_mm": thickness,
        "noise_sigma_hu": app.noise_sigma,
        "low_dose": app.low_dose,
        "blur_sigma_mm": list(app.blur_sigma_mm()),
        "bones_present": [Bone(i).name.lower() for i in range(1, len(Bone) + 1) if counts[i]],
        "distractors_present": in_view,
        **anatomy.geometry,
    }
    return Phantom(image, image.with_array(labels), geometry, thickness)


def _base_name(name: str) -> str:
    return name.rsplit("_", 1)[0] if name.endswith(("_left", "_right")) else name


def _full_grid(
    anatomy: Anatomy,
    region: str,
    sp: tuple[float, float, float],
    shape_xy: tuple[int, int],
    rng: np.random.Generator,
) -> Grid:
    lm = anatomy.landmarks
    scale = anatomy.geometry["scale"]
    sole = float(lm["sole"][2]) - 20.0
    if region == "whole_legs":
        z_lo, z_hi = sole, float(lm["crest_top"][2]) + 35.0 * scale
    elif region == "torso":
        hip_z = (lm["hip_left"][2] + lm["hip_right"][2]) / 2
        femur = anatomy.geometry["sides"]["left"]["femur_length_mm"]
        z_lo, z_hi = float(hip_z - 0.5 * femur), float(lm["l4_top"][2]) + 10.0
    else:
        z_lo, z_hi = sole, float(max(lm["knee_left"][2], lm["knee_right"][2])) + 100.0 * scale
    nz = int(np.ceil((z_hi - z_lo) / sp[2])) + 1
    nx, ny = shape_xy
    cx = float(rng.uniform(-15, 15))
    cy = anatomy.soft.table_y - float(rng.uniform(95, 140))
    origin = (cx - sp[0] * (nx - 1) / 2, cy - sp[1] * (ny - 1) / 2, z_lo)
    return Grid((nz, ny, nx), sp, origin)


def _small_grid(
    anatomy: Anatomy, region: str, sp: tuple[float, float, float], rng: np.random.Generator
) -> Grid:
    side = str(rng.choice(["left", "right"]))
    sign = 1.0 if side == "left" else -1.0
    lm = anatomy.landmarks
    if region == "hip":
        centre = lm[f"hip_{side}"] + np.array([-12.0 * sign, 0.0, -5.0])
    elif region == "knee":
        centre = lm[f"knee_{side}"] + np.array([0.0, 0.0, -5.0])
    else:
        centre = lm[f"subtalar_{side}"]
    centre = centre + rng.uniform(-6, 6, size=3)
    n = [min(SMALL_MAX_VOXELS, round(SMALL_EXTENT_MM / s)) for s in sp]
    origin = tuple(float(c - s * (k - 1) / 2) for c, s, k in zip(centre, sp, n, strict=True))
    return Grid((n[2], n[1], n[0]), sp, origin)  # type: ignore[arg-type]


def write_phantom_truth(phantom: Phantom, out_dir: Path) -> dict[str, Path]:
    """Write the ground truth, labels.nii.gz and geometry.json, into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"labels": out_dir / "labels.nii.gz", "geometry": out_dir / "geometry.json"}
    write_volume(phantom.labels, paths["labels"])
    paths["geometry"].write_text(json.dumps(phantom.geometry, indent=2, sort_keys=True))
    return paths


def write_phantom_nifti(phantom: Phantom, out_dir: Path) -> dict[str, Path]:
    """Write image.nii.gz, labels.nii.gz and geometry.json into ``out_dir``; returns the paths."""
    image = Path(out_dir) / "image.nii.gz"
    paths = write_phantom_truth(phantom, out_dir)
    write_volume(phantom.image, image)
    return {"image": image, **paths}


__all__ = [
    "PHANTOM_VERSION",
    "Phantom",
    "generate_phantom",
    "write_phantom_nifti",
    "write_phantom_truth",
]
