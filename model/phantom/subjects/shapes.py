"""Real bone surfaces (`../shared/data/shapes/`): the LLP26 shape model and the Visible Human feet.

Every mesh comes back in DICOM patient coordinates (LPS, mm: +x left, +y posterior, +z
superior) as a :class:`Mesh`. LLP26 holds one pelvis with the LEFT femur, patella, tibia and
fibula of 26 real subjects in point correspondence (a PCA with 25 modes); a shape is the mean
plus the modes weighted by a subject's scores, or by new scores drawn within +-2.5 SD. The
right leg is a left leg mirrored (``Mesh.mirrored``). The feet are the Visible Human Male's and
Female's, each in its own dataset frame, turned here into LPS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

# The sphere fit lives with the measurements that use it on label maps (issue 19).
from model.measure.geometry import fit_sphere

SHAPES_ENV = "DICOM_NODE_SHAPES"
LLP26_BONES = ("sacrum", "hip_left", "hip_right", "femur", "patella", "tibia", "fibula")
LLP26_SUBJECTS = 26
# Shape subjects the shipped weights never saw: phantoms of these test generalisation to new
# patients (bench.real_ct, tests). Training draws from the others and from new mode scores.
HELD_OUT_SUBJECTS = (21, 22, 23, 24, 25)
FOOT_BONES = (
    "talus",
    "calcaneus",
    "navicular",
    "cuboid",
    "medial_cuneiform",
    "intermediate_cuneiform",
    "lateral_cuneiform",
    "metatarsals_phalanges",
)
# Visible Human frames (shapes/README.md) to LPS: VHM +x left, +y anterior, +z inferior; VHF
# +x right, +y anterior, +z superior.
FOOT_FRAME_TO_LPS = {"VHM": np.array([1.0, -1.0, -1.0]), "VHF": np.array([-1.0, -1.0, 1.0])}


def shapes_dir() -> Path:
    """The shape data folder: $DICOM_NODE_SHAPES, else ../shared/data/shapes beside the repo."""
    if os.environ.get(SHAPES_ENV):
        return Path(os.environ[SHAPES_ENV])
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "shapes"


@dataclass(frozen=True)
class Mesh:
    """A closed triangle surface: vertices (N, 3) float64 mm, faces (M, 3) int."""

    vertices: np.ndarray
    faces: np.ndarray

    def transformed(self, rotation: np.ndarray, centre: np.ndarray, shift: np.ndarray) -> Mesh:
        """Rotated by ``rotation`` about ``centre``, then moved by ``shift``."""
        moved = (self.vertices - centre) @ np.asarray(rotation).T + centre + shift
        return Mesh(moved, self.faces)

    def mirrored(self, x_plane: float) -> Mesh:
        """Mirrored across the sagittal plane x = ``x_plane``; faces flipped to stay outward."""
        v = self.vertices.copy()
        v[:, 0] = 2 * x_plane - v[:, 0]
        return Mesh(v, self.faces[:, ::-1].copy())

    def scaled(self, factor: float, centre: np.ndarray) -> Mesh:
        return Mesh((self.vertices - centre) * factor + centre, self.faces)

    @property
    def lo(self) -> np.ndarray:
        return self.vertices.min(axis=0)

    @property
    def hi(self) -> np.ndarray:
        return self.vertices.max(axis=0)


@dataclass(frozen=True)
class ShapeModel:
    mean: np.ndarray  # (V, 3)
    modes: np.ndarray  # (K, V, 3)
    sd: np.ndarray  # (K,) mm
    subject_scores: np.ndarray  # (S, K) mm
    faces: np.ndarray
    vertex_bone: np.ndarray
    face_bone: np.ndarray

    def scores_of(self, subject: int) -> np.ndarray:
        return self.subject_scores[subject]

    def draw_scores(self, rng: np.random.Generator, limit_sd: float = 2.5) -> np.ndarray:
        """New mode scores (mm): standard normal per mode, clipped to +-``limit_sd``."""
        return np.clip(rng.standard_normal(len(self.sd)), -limit_sd, limit_sd) * self.sd

    def bones(self, scores: np.ndarray) -> dict[str, Mesh]:
        """The seven bone meshes of the shape with these mode scores."""
        vertices = self.mean + np.tensordot(scores, self.modes, axes=1)
        out = {}
        for index, name in enumerate(LLP26_BONES):
            keep = self.vertex_bone == index
            remap = np.cumsum(keep) - 1
            faces = self.faces[self.face_bone == index]
            out[name] = Mesh(vertices[keep].astype(np.float64), remap[faces])
        return out


@cache
def llp26() -> ShapeModel:
    path = shapes_dir() / "llp26" / "llp26_ssm.npz"
    with np.load(path, allow_pickle=False) as d:
        return ShapeModel(
            d["mean_vertices"].astype(np.float64),
            d["modes"].astype(np.float64),
            d["sd"].astype(np.float64),
            d["subject_scores"].astype(np.float64),
            d["faces"],
            d["vertex_bone"],
            d["face_bone"],
        )


@cache
def foot(subject: str, side: str) -> dict[str, Mesh]:
    """The Visible Human ``subject`` ("VHM" or "VHF") ``side`` foot's bones, in LPS."""
    flip = FOOT_FRAME_TO_LPS[subject]
    out = {}
    for bone in FOOT_BONES:
        with np.load(shapes_dir() / "foot" / f"{subject}_{side}_{bone}.npz") as d:
            vertices = d["vertices"].astype(np.float64) * flip
            faces = d["faces"]
        # An odd number of flipped axes turns the surface inside out.
        if np.prod(flip) < 0:
            faces = faces[:, ::-1]
        out[bone] = Mesh(vertices, np.ascontiguousarray(faces))
    return out


def femoral_head(femur: Mesh, hip: Mesh) -> tuple[np.ndarray, float]:
    """Centre and radius of the femoral head: a sphere through the femur's vertices that face
    the acetabulum (within 12 mm of the hip bone), refitted on those near the first sphere."""
    v = femur.vertices
    near = min_distances(v, hip.vertices) < 12.0
    centre, radius = fit_sphere(v[near])
    for _ in range(3):
        shell = np.abs(np.linalg.norm(v - centre, axis=1) - radius) < 3.0
        shell &= np.linalg.norm(v - centre, axis=1) < 1.5 * radius
        centre, radius = fit_sphere(v[shell])
    return centre, radius


def min_distances(points: np.ndarray, others: np.ndarray, chunk: int = 2048) -> np.ndarray:
    out = np.empty(len(points))
    for i in range(0, len(points), chunk):
        d = points[i : i + chunk, None, :] - others[None, :, :]
        out[i : i + chunk] = np.sqrt((d**2).sum(-1)).min(axis=1)
    return out
