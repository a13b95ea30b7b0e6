"""The pelvic reference frame from the anterior pelvic plane (APP) of the hip bones.

The APP is the plane through both anterior superior iliac spines (ASIS) and the pubic
tubercles (Lewinnek et al. 1978). On a hip bone's points (its surface voxels, or points on a
mesh) the ASIS is the most anterior point above the acetabulum and the pubic tubercle the most
anterior point below it and medial of it (above, below and medial along the patient's axes);
"anterior" is the frame's own, found by iterating from the patient's: each round, the plane
through both ASIS and the middle of the tubercles gives the next anterior direction (its
normal), until the four points stay put. The plane then rests on the pelvis' front, whatever
its tilt on the table. With one hip bone whole in view its ASIS and tubercle give the plane's
tilt, and the scanner's left-right axis (made square to them) stands in for the line between
the spines. docs/measurements.md defines it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.labels import Side
from model.measure.geometry import unit

FRAME_ROUNDS = 20
LEFT = np.array([1.0, 0.0, 0.0])  # LPS: +x is the patient's left
SUPERIOR = np.array([0.0, 0.0, 1.0])


@dataclass(frozen=True)
class PelvicFrame:
    """Unit axes (LPS) of the pelvis: ``left`` (right to left ASIS), ``superior`` (in the APP,
    square to ``left``) and ``anterior`` (the APP's normal); ``landmarks`` the points found
    (``asis`` and ``pubic_tubercle`` per side); ``sides`` the hip bones it was built on."""

    left: np.ndarray
    superior: np.ndarray
    anterior: np.ndarray
    landmarks: dict[Side, dict[str, np.ndarray]]
    sides: tuple[Side, ...]

    def lateral(self, side: Side) -> np.ndarray:
        """The direction away from the midline on ``side``."""
        return self.left if side is Side.LEFT else -self.left

    @property
    def description(self) -> str:
        if len(self.sides) == 2:
            return "anterior pelvic plane (both ASIS and pubic tubercles)"
        return (
            f"anterior pelvic plane of the {self.sides[0].name.lower()} hip bone alone (its ASIS "
            "and pubic tubercle; the scanner's left-right axis for the other side)"
        )


def _frame(left: np.ndarray, up_hint: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    left = unit(left)
    superior = unit(up_hint - (up_hint @ left) * left)
    return left, superior, np.cross(left, superior)  # LPS: left x superior = anterior


def anterior_pelvic_plane(
    hip_bones: dict[Side, np.ndarray], centres: dict[Side, np.ndarray]
) -> PelvicFrame:
    """The pelvic frame of the hip bones' points (mm, LPS) given per side, with each side's
    acetabular centre (the femoral head's) in ``centres``: two sides, the APP through both
    ASIS and the middle of the pubic tubercles; one side, the plane through its ASIS and
    tubercle that holds the scanner's left-right axis."""
    sides = tuple(s for s in (Side.RIGHT, Side.LEFT) if s in hip_bones)
    if not sides:
        raise ValueError("an anterior pelvic plane needs a hip bone")
    if len(sides) == 2:
        left, superior, anterior = _frame(centres[Side.LEFT] - centres[Side.RIGHT], SUPERIOR)
    else:
        left, superior, anterior = _frame(LEFT, SUPERIOR)
    # Where each landmark is looked for stays as the patient's axes put it: a frame turned by
    # the rounds would move the regions and could run away with them.
    regions = {
        side: landmark_regions(hip_bones[side], centres[side], side, left, superior)
        for side in sides
    }
    found: dict[Side, dict[str, np.ndarray]] = {}
    for _ in range(FRAME_ROUNDS):
        previous = found
        found = {}
        for side in sides:
            points = hip_bones[side]
            depth = points @ anterior
            found[side] = {
                name: points[region][int(np.argmax(depth[region]))]
                for name, region in regions[side].items()
            }
        if len(sides) == 2:
            asis = (found[Side.LEFT]["asis"] + found[Side.RIGHT]["asis"]) / 2
            tubercles = (
                found[Side.LEFT]["pubic_tubercle"] + found[Side.RIGHT]["pubic_tubercle"]
            ) / 2
            left, superior, anterior = _frame(
                found[Side.LEFT]["asis"] - found[Side.RIGHT]["asis"], asis - tubercles
            )
        else:
            (only,) = found.values()
            left, superior, anterior = _frame(LEFT, only["asis"] - only["pubic_tubercle"])
        if previous and all(
            np.array_equal(previous[s][k], found[s][k]) for s in sides for k in found[s]
        ):
            break
    return PelvicFrame(left, superior, anterior, found, sides)


def landmark_regions(
    points: np.ndarray, centre: np.ndarray, side: Side, left: np.ndarray, superior: np.ndarray
) -> dict[str, np.ndarray]:
    """Where on a hip bone's ``points`` each landmark is the most anterior point (boolean):
    the ASIS above the acetabular ``centre``, the pubic tubercle below and medial of it."""
    offsets = points - centre
    medial = -left if side is Side.LEFT else left
    return {
        "asis": offsets @ superior > 0,
        "pubic_tubercle": (offsets @ superior < 0) & (offsets @ medial > 0),
    }
