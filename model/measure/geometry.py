"""Landmarks and angles of the leg's mechanical axes from points on bone surfaces (mm, LPS).

Pure geometry on point clouds: the same functions measure a label map (the surface voxels of
each bone, :mod:`model.measure.alignment`) and the subject phantom's true surfaces (points
sampled on its meshes, :mod:`model.phantom.subjects.truth`), so a difference between the two
is the label map's doing, not a second definition. Every landmark is defined in a frame the
bone itself gives (its mechanical axis, its condyles), so it does not depend on how the leg
lies in the scanner. Coordinates are DICOM patient coordinates: +x left, +y posterior,
+z superior. docs/measurements.md defines each landmark and angle.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

# Depths (mm, along the bone's mechanical axis) of the end slabs whose centres are the joint
# centres: the femoral condyles, the tibial plateau, the talar dome, the malleolar tips.
FEMORAL_CONDYLE_SLAB_MM = 25.0
FEMORAL_CONDYLE_SKIP_MM = 8.0
# The tibial head is measured 30-50 mm below its top, not at the plateau: the articular end
# is where segmentations err (cartilage, bones that touch), and the shape model's tibiae reach
# up to ~35 mm into their femurs' volume (the spines into a notch the meshes close), so a
# label map cannot hold both bones' ends whole there.
TIBIAL_PLATEAU_SLAB_MM = 50.0
TIBIAL_PLATEAU_SKIP_MM = 30.0
TALAR_DOME_SLAB_MM = 4.0
MALLEOLUS_SLAB_MM = 4.0
# The posterior condyles are looked for this far above the distal end of the femur.
POSTERIOR_CONDYLE_SEARCH_MM = 35.0
POSTERIOR_CONDYLE_DEPTH_MM = 1.5
# Sphere refinement: surface points within this distance of the sphere count as the head.
HEAD_SHELL_MM = 2.0
# Femur surface this close to the hip bone faces the acetabulum: the head's first sphere.
NEAR_ACETABULUM_MM = 10.0
# Without a hip bone the first sphere is fitted to the femur's top this far down.
PROXIMAL_TOP_MM = 30.0
# Seed points this close are one patch of surface: more than the diagonal of a 1 x 1 x 5 mm
# voxel (5.2 mm), so that the head's own surface stays one patch in thick slices.
SEED_LINK_MM = 6.0
# The first sphere rests on the seed's points nearest it, this fraction of them (`trimmed_sphere`).
SEED_KEPT_FRACTION = 0.5
SEED_TRIM_ROUNDS = 10
AXIS_ROUNDS = 4
POSTERIOR = np.array([0.0, 1.0, 0.0])  # LPS: +y is the patient's posterior


def unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` scaled to length 1."""
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise ValueError("a zero vector has no direction")
    return np.asarray(vector, dtype=np.float64) / norm


def fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through ``points`` (N, 3): centre and radius."""
    a = np.hstack([2 * points, np.ones((len(points), 1))])
    b = (points**2).sum(axis=1)
    solution = np.linalg.lstsq(a, b, rcond=None)[0]
    centre = solution[:3]
    return centre, float(np.sqrt(solution[3] + centre @ centre))


def principal_axis(points: np.ndarray, towards: np.ndarray) -> np.ndarray:
    """The direction of largest spread of ``points`` (a long bone's shaft), signed to point
    along ``towards``."""
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred[:: max(1, len(centred) // 20000)], full_matrices=False)
    axis = vt[0]
    return axis if axis @ towards >= 0 else -axis


def refine_sphere(
    points: np.ndarray, centre: np.ndarray, radius: float, rounds: int = 12
) -> tuple[np.ndarray, float, int]:
    """A sphere refitted on the ``points`` within HEAD_SHELL_MM of it (and within 1.5 radii of
    its centre), ``rounds`` times: what sticks out of the sphere (a neck, a spurious bump of
    segmentation) stops pulling on it. Centre, radius and how many points it rests on."""
    used = len(points)
    for _ in range(rounds):
        distance = np.linalg.norm(points - centre, axis=1)
        shell = (np.abs(distance - radius) < HEAD_SHELL_MM) & (distance < 1.5 * radius)
        if shell.sum() < 20:
            break
        previous = centre
        centre, radius = fit_sphere(points[shell])
        used = int(shell.sum())
        if np.linalg.norm(centre - previous) < 0.01:
            break
    return centre, radius, used


def trimmed_sphere(
    points: np.ndarray,
    kept: float = SEED_KEPT_FRACTION,
    rounds: int = SEED_TRIM_ROUNDS,
) -> tuple[np.ndarray, float]:
    """A sphere fitted to the ``kept`` fraction of ``points`` nearest it: fitted to all, then
    refitted ``rounds`` times to those whose distance to the sphere is below that fraction's
    quantile, until they stay the same. Points off the sphere (another bone's surface, as long
    as it is less than half of them) are left out however far they pull the first fit."""
    centre, radius = fit_sphere(points)
    kept_before = np.ones(len(points), dtype=bool)
    for _ in range(rounds):
        residual = np.abs(np.linalg.norm(points - centre, axis=1) - radius)
        nearest = residual <= np.quantile(residual, kept)
        if np.array_equal(nearest, kept_before):
            break
        centre, radius = fit_sphere(points[nearest])
        kept_before = nearest
    return centre, radius


def largest_patch(points: np.ndarray, link_mm: float = SEED_LINK_MM) -> np.ndarray:
    """The largest connected patch of ``points``: those linked to each other through points
    less than ``link_mm`` apart."""
    pairs = cKDTree(points).query_pairs(link_mm, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), (len(points),) * 2)
    _, patch = connected_components(graph, directed=False)
    return points[patch == np.bincount(patch).argmax()]


def femoral_head_sphere(
    femur: np.ndarray, hip_bone: np.ndarray | None
) -> tuple[np.ndarray, float, int] | None:
    """The femoral head's sphere (centre, radius, points it rests on): first fitted to the
    femur's surface within NEAR_ACETABULUM_MM of the hip bone's (or, without a hip bone, to
    the femur's top PROXIMAL_TOP_MM): to its largest patch (`largest_patch`), trimmed
    (`trimmed_sphere`); then refitted on the surface near it (`refine_sphere`). None when too
    little surface faces the acetabulum.

    The seed is not all head: with the hip rotated far (some 30 deg), the femur's surface
    behind and below the head (about the lesser trochanter) comes within NEAR_ACETABULUM_MM
    of the ischium, a few hundred to a thousand points 40 mm from the head's centre. A plain
    fit to the seed is pulled so far towards them (a centre 5-17 mm off, a radius 30-35 mm)
    that `refine_sphere`'s shell then settles off the head. That surface is mostly a patch
    apart from the head's, which the largest patch leaves out whatever its size; where it
    joins the head's (a ridge of neck between them), it is a small part of the patch, which
    the trimmed fit leaves out."""
    if hip_bone is not None:
        distance, _ = cKDTree(hip_bone).query(femur, distance_upper_bound=NEAR_ACETABULUM_MM)
        # Rounded to a micrometre: voxel centres exactly NEAR_ACETABULUM_MM apart (6 and 8 mm
        # across, say) then fall on the same side however the voxels are stored.
        seed = femur[np.round(distance, 6) < NEAR_ACETABULUM_MM]
    else:
        t = femur @ principal_axis(femur, np.array([0.0, 0.0, 1.0]))
        seed = femur[t > t.max() - PROXIMAL_TOP_MM]
    if len(seed) < 50:
        return None
    centre, radius = trimmed_sphere(largest_patch(seed))
    return refine_sphere(femur, centre, radius)


def end_slab_centre(
    points: np.ndarray, axis: np.ndarray, depth_mm: float, skip_mm: float = 0.0
) -> np.ndarray:
    """The centre of a bone's end: the mean of the ``points`` between ``skip_mm`` and
    ``depth_mm`` from its extreme along ``axis``, placed at that extreme's level."""
    t = points @ axis
    end = float(t.max())
    slab = points[(t > end - depth_mm) & (t <= end - skip_mm)]
    mean = slab.mean(axis=0)
    return mean + (end - mean @ axis) * axis


def femoral_knee_centre(femur: np.ndarray, head_centre: np.ndarray) -> np.ndarray:
    """The centre of the femoral condyles (at the intercondylar notch): the mean of the femur's
    surface 8-25 mm from its distal end (the condyles), the slab square to the femoral
    mechanical axis (head centre to this point, found by iterating from the shaft's axis)."""
    distal = -principal_axis(femur, head_centre - femur.mean(axis=0))
    centre = end_slab_centre(femur, distal, FEMORAL_CONDYLE_SLAB_MM, FEMORAL_CONDYLE_SKIP_MM)
    for _ in range(AXIS_ROUNDS):
        axis = unit(centre - head_centre)
        centre = end_slab_centre(femur, axis, FEMORAL_CONDYLE_SLAB_MM, FEMORAL_CONDYLE_SKIP_MM)
    return centre


def tibial_centres(
    tibia: np.ndarray,
    talus: np.ndarray | None,
    fibula: np.ndarray | None,
    proximal_hint: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Tibial knee centre and ankle centre, each square to the tibial mechanical axis between
    them (iterated from the shaft's axis): the knee centre is the mean of the tibia's surface
    30-50 mm below its proximal end (the tibial head under the plateau), placed at that end; the
    ankle centre is the talar dome's (the mean of its top TALAR_DOME_SLAB_MM), or without a
    talus the midpoint of the malleoli (the tips of tibia and fibula). ``proximal_hint``: a
    direction towards the knee (+z will do). Returns knee, ankle and which ankle it is."""
    if talus is None and fibula is None:
        raise ValueError("an ankle centre needs a talus or the fibula's malleolus")
    axis = principal_axis(tibia, proximal_hint)
    knee = ankle = np.zeros(3)
    kind = "talar dome" if talus is not None else "malleoli"
    for _ in range(AXIS_ROUNDS + 1):
        knee = end_slab_centre(tibia, axis, TIBIAL_PLATEAU_SLAB_MM, TIBIAL_PLATEAU_SKIP_MM)
        if talus is not None:
            ankle = end_slab_centre(talus, axis, TALAR_DOME_SLAB_MM)
        else:
            assert fibula is not None
            medial = end_slab_centre(tibia, -axis, MALLEOLUS_SLAB_MM)
            lateral = end_slab_centre(fibula, -axis, MALLEOLUS_SLAB_MM)
            ankle = (medial + lateral) / 2
        axis = unit(knee - ankle)
    return knee, ankle, kind


def posterior_condyles(
    femur: np.ndarray, head_centre: np.ndarray, knee_centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The most posterior points of the medial and lateral femoral condyles (the posterior
    condylar axis, the leg's medio-lateral reference): in the femur's frame (mechanical axis;
    posterior first the patient's, then square to the condylar axis found), the mean of each
    condyle's points within POSTERIOR_CONDYLE_DEPTH_MM of its most posterior one. The
    condyles are the halves of the distal femur either side of the knee centre; the medial
    one is on the side away from the shaft's middle. Returns (medial, lateral)."""
    up = unit(head_centre - knee_centre)
    t = (femur - knee_centre) @ up
    distal = femur[t < t.min() + POSTERIOR_CONDYLE_SEARCH_MM]
    posterior = unit(POSTERIOR - (POSTERIOR @ up) * up)
    medial_dir = unit(np.cross(up, posterior))
    medial = lateral = knee_centre
    # The shaft bows lateral of the mechanical axis (the head sits medially on its neck).
    shaft = femur.mean(axis=0) - knee_centre
    for _ in range(AXIS_ROUNDS):
        if shaft @ medial_dir > 0:
            medial_dir = -medial_dir
        side = (distal - knee_centre) @ medial_dir
        found = []
        for half in (distal[side > 0], distal[side <= 0]):
            depth = half @ posterior
            found.append(half[depth > depth.max() - POSTERIOR_CONDYLE_DEPTH_MM].mean(axis=0))
        medial, lateral = found
        across = medial - lateral
        medial_dir = unit(across - (across @ up) * up)
        posterior = unit(np.cross(medial_dir, up))
        if posterior @ POSTERIOR < 0:
            posterior = -posterior
    return medial, lateral


def hka_angles(
    head_centre: np.ndarray,
    femoral_knee: np.ndarray,
    tibial_knee: np.ndarray,
    ankle_centre: np.ndarray,
    medial_condyle: np.ndarray,
    lateral_condyle: np.ndarray,
) -> tuple[float, float]:
    """The hip-knee-ankle angle in 3-D and in the leg's coronal plane, degrees, 0 for a
    straight leg, varus negative on either side.

    The femoral mechanical axis runs from the femoral knee centre to the head centre, the
    tibial one from the ankle centre to the tibial knee centre. 3-D: the angle between them,
    given the coronal value's sign. Coronal: the angle of the tibial axis to the femur's
    sagittal plane (the plane of its mechanical axis square to the posterior condylar axis);
    for a straight knee that is the angle of the axes projected on the coronal plane, and,
    unlike that projection, knee flexion does not change it. Varus, the knee lateral of the
    hip-ankle line, has the ankle medial of the femoral axis' prolongation."""
    femoral = unit(head_centre - femoral_knee)
    tibial_down = unit(ankle_centre - tibial_knee)
    across = medial_condyle - lateral_condyle
    medial = unit(across - (across @ femoral) * femoral)
    coronal = float(np.degrees(np.arcsin(np.clip(-(tibial_down @ medial), -1.0, 1.0))))
    angle_3d = float(np.degrees(np.arccos(np.clip(-(tibial_down @ femoral), -1.0, 1.0))))
    return float(np.copysign(angle_3d, coronal)), coronal
