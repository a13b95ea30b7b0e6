"""Subject phantoms from real bone shapes (model.phantom.subjects): voxelisation with known
volumes, the skeleton's geometry, and a generated phantom's labels and tissues."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from model.labels import Bone
from model.phantom.subjects.shapes import HELD_OUT_SUBJECTS, Mesh, shapes_dir
from model.phantom.subjects.voxelise import voxelise
from model.training.synthesis import Tissue

needs_shapes = pytest.mark.skipif(
    not (shapes_dir() / "llp26" / "llp26_ssm.npz").is_file(),
    reason=f"shape data not found at {shapes_dir()} (../shared/data/shapes)",
)


def _uv_sphere(radius: float, n: int = 40) -> Mesh:
    theta = np.linspace(0, np.pi, n)[1:-1]
    phi = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
    ring = [
        [radius * np.sin(t) * np.cos(p), radius * np.sin(t) * np.sin(p), radius * np.cos(t)]
        for t in theta
        for p in phi
    ]
    vertices = np.array([[0, 0, radius], *ring, [0, 0, -radius]], float)
    m, faces = 2 * n, []
    for j in range(m):
        faces.append([0, 1 + j, 1 + (j + 1) % m])
    for i in range(len(theta) - 1):
        for j in range(m):
            a, b = 1 + i * m + j, 1 + i * m + (j + 1) % m
            faces += [[a, a + m, b], [b, a + m, b + m]]
    last, base = len(vertices) - 1, 1 + (len(theta) - 1) * m
    for j in range(m):
        faces.append([base + j, last, base + (j + 1) % m])
    return Mesh(vertices, np.array(faces))


def _mesh_volume(mesh: Mesh) -> float:
    t = mesh.vertices[mesh.faces]
    return float(np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6)


def test_voxelised_sphere_has_the_meshes_volume() -> None:
    sphere = _uv_sphere(10.0)
    mask = voxelise(sphere.vertices, sphere.faces, np.full(3, -12.0), np.full(3, 0.5), (49, 49, 49))
    assert abs(mask.sum() * 0.125 - _mesh_volume(sphere)) < 0.01 * _mesh_volume(sphere)


def test_a_hole_in_the_mesh_does_not_leak_along_its_column() -> None:
    sphere = _uv_sphere(10.0)
    holed = Mesh(sphere.vertices, sphere.faces[1:])  # one triangle at the top missing
    mask = voxelise(holed.vertices, holed.faces, np.full(3, -12.0), np.full(3, 0.5), (49, 49, 49))
    assert not mask[-1].any() and not mask[0].any()
    assert abs(mask.sum() * 0.125 - _mesh_volume(sphere)) < 0.02 * _mesh_volume(sphere)


def test_part_of_a_mesh_below_the_grid_still_fills_the_grid_above_it() -> None:
    sphere = _uv_sphere(10.0)
    # The grid starts at z = 0: the lower half's crossings toggle at the first plane.
    mask = voxelise(
        sphere.vertices, sphere.faces, np.array([-12.0, -12.0, 0.25]), np.full(3, 0.5), (24, 49, 49)
    )
    assert abs(mask.sum() * 0.125 - _mesh_volume(sphere) / 2) < 0.03 * _mesh_volume(sphere)


def test_part_of_a_mesh_above_the_grid_still_fills_the_grid_below_it() -> None:
    """A bone the field of view cuts at its top (a femur in a knee scan): its columns cross the
    mesh an odd number of times inside the grid, and must not be taken for holes."""
    sphere = _uv_sphere(10.0)
    # The grid ends at z = -0.25: the upper half's crossings lie above it.
    mask = voxelise(
        sphere.vertices,
        sphere.faces,
        np.array([-12.0, -12.0, -11.75]),
        np.full(3, 0.5),
        (24, 49, 49),
    )
    assert mask[-1].sum() * 0.25 > 0.95 * np.pi * 10.0**2  # the cut face is full
    assert abs(mask.sum() * 0.125 - _mesh_volume(sphere) / 2) < 0.03 * _mesh_volume(sphere)


@needs_shapes
def test_llp26_bones_and_their_mirror_images_keep_their_volume() -> None:
    from model.phantom.subjects.shapes import llp26

    model = llp26()
    bones = model.bones(model.scores_of(3))
    femur = bones["femur"]
    mirrored = femur.mirrored(0.0)
    assert _mesh_volume(mirrored) == pytest.approx(_mesh_volume(femur), rel=1e-9)
    assert 300e3 < _mesh_volume(femur) < 700e3  # mm3: adult femora (README: 478 cm3 mean)
    length = femur.vertices[:, 2].max() - femur.vertices[:, 2].min()
    assert 380 < length < 500


@needs_shapes
def test_a_held_out_subjects_skeleton_is_anatomical() -> None:
    from model.phantom.subjects.skeleton import build_skeleton

    skeleton = build_skeleton(np.random.default_rng(0), subject=HELD_OUT_SUBJECTS[0])
    lm = skeleton.landmarks
    for side, sign in (("left", 1.0), ("right", -1.0)):
        hip, knee, ankle = lm[f"hip_{side}"], lm[f"knee_{side}"], lm[f"ankle_{side}"]
        assert hip[2] > knee[2] > ankle[2]
        assert 330 < np.linalg.norm(hip - knee) < 520 and 280 < np.linalg.norm(knee - ankle) < 460
        assert 18.0 < lm[f"femoral_head_radius_{side}"][0] < 30.0
        # The left hip lies at +x (LPS), the right at -x, at least 60 mm from each other.
        assert (
            sign * (lm[f"hip_{side}"][0] - lm["hip_left" if side == "right" else "hip_right"][0])
            > 60
        )
    names = {p.name for p in skeleton.parts}
    assert {"talus_left", "calcaneus_right", "femur_left", "hip_bone_right", "sacrum"} <= names
    talus = next(p for p in skeleton.parts if p.name == "talus_left").mesh
    tibia = next(p for p in skeleton.parts if p.name == "tibia_left")
    _, distal = tibia.axis
    # The talus lies under the tibia's distal end, whatever the pose.
    assert np.linalg.norm(talus.vertices.mean(axis=0) - distal) < 45.0


@needs_shapes
@pytest.mark.parametrize("subject", [0, 9])
def test_knees_are_articulated_condyles_on_plateaus_without_overlap(subject: int) -> None:
    """LLP26 subjects 0 and 9 hold their tibiae 39 and 47 mm up into the femur (52 and 72 ml
    of the two overlap); the skeleton seats each knee: no overlap, the condyles resting a joint
    space above the plateaus."""
    from model.phantom.subjects.skeleton import KNEE_JOINT_SPACE_MM, LegPose, build_skeleton

    straight = LegPose(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    skeleton = build_skeleton(np.random.default_rng(0), subject=subject, poses=(straight,) * 2)
    meshes = {p.name: p.mesh for p in skeleton.parts}
    femur, tibia = meshes["femur_left"], meshes["tibia_left"]
    lo = np.minimum(femur.vertices.min(0), tibia.vertices.min(0))
    extent = np.ceil(np.maximum(femur.vertices.max(0), tibia.vertices.max(0)) - lo).astype(int)
    shape = tuple(int(n) + 1 for n in extent[::-1])  # z, y, x at 1 mm: both whole bones
    inside = [voxelise(m.vertices, m.faces, lo, np.ones(3), shape) for m in (femur, tibia)]
    assert not (inside[0] & inside[1]).any()
    # Under the condyles, bone to bone along z: the joint space, give or take the mesh's facets.
    gap = ndimage.distance_transform_edt(~inside[1])[inside[0]].min()
    assert KNEE_JOINT_SPACE_MM - 2.5 <= gap <= KNEE_JOINT_SPACE_MM + 1.0


@pytest.fixture(scope="module")
def ankle():
    from model.phantom.subjects import generate_subject_phantom

    return generate_subject_phantom(11, region="ankle", subject=HELD_OUT_SUBJECTS[1])


@needs_shapes
def test_subject_phantom_labels_sit_on_bone_tissue_with_joint_spaces(ankle) -> None:
    labels, tissues = ankle.labels.array, ankle.tissues.array
    assert labels.shape == tissues.shape
    present = set(np.unique(labels).tolist()) - {0}
    assert {Bone.TALUS, Bone.CALCANEUS, Bone.TIBIA} <= present
    bone_tissues = {Tissue.CORTEX, Tissue.CANCELLOUS, Tissue.MARROW, Tissue.GROWTH_PLATE}
    assert set(np.unique(tissues[labels > 0]).tolist()) <= {int(t) for t in bone_tissues}
    assert {Tissue.FAT, Tissue.MUSCLE, Tissue.SKIN} <= set(np.unique(tissues).tolist())
    # Cartilage keeps talus and tibia apart: no voxel of one touches the other (26-neighbours).
    near_tibia = ndimage.binary_dilation(labels == Bone.TIBIA, np.ones((3, 3, 3), bool))
    assert not np.any(near_tibia & (labels == Bone.TALUS))
    assert np.any(tissues == Tissue.CARTILAGE)


@needs_shapes
def test_subject_phantom_image_is_ct_like(ankle) -> None:
    image = ankle.image(np.random.default_rng(0)).array
    labels, tissues = ankle.labels.array, ankle.tissues.array
    assert image.dtype == np.int16 and image.shape == labels.shape
    assert np.median(image[tissues == Tissue.FAT]) < -40
    assert np.median(image[labels > 0]) > 150
    again = ankle.image(np.random.default_rng(0)).array
    assert np.array_equal(image, again)
