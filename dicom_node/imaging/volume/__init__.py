"""Series -> volume: a received CT series as a volume in Hounsfield units, and the way back.

The stage between reception and segmentation. It takes the files of one series, decides from
the headers alone whether the series qualifies (`select_series`, a skip reason or None) and
builds the volume (`assemble_volume`): frames sorted along the slice normal, HU from each
frame's own rescale, on a regular orthogonal grid. Tilted or irregularly spaced stacks are
resampled or rejected by policy; the source frames and their geometry are kept, because the
DICOM SEG must be written on the source images' grid, not on ours.

The modules: `policy` (`AssemblyPolicy`, the `[series]` section, and `AssemblyError`; light:
the configuration imports it), `headers` (`read_headers`, the frames an instance holds),
`planning` (the rules below on headers alone: which frames, in which order, on which grid),
`geometry` (the source grid and the numerics of a stack: spacing analysis, resampling) and
`assemble` (the public stage: `survey_series`, `choose_series`, `select_series`,
`assemble_volume`). This file re-exports nothing, so that importing the policy does not
import SimpleITK.

The rules, in the order they are applied (the first that fails is the reason); headers the
rules cannot make sense of (NaN or infinite positions, zero or negative pixel spacing, zero
rows or columns, orientation cosines that are not unit vectors, ...) are a reason too, never
an exception of another kind:

1. Instances: CT Image, Enhanced CT or Legacy Converted Enhanced CT, by SOP Class UID (from the
   file meta information, or Modality CT with an image plane, when the dataset's is empty).
   Others give "secondary capture" or "not a CT image (<SOP class>)". Files that are not DICOM
   instances (a Philips DIRFILE, a DICOMDIR, junk) are skipped and counted by `read_headers`.
2. Frames: single-frame instances give one frame, Enhanced CT one per frame, with per-frame
   functional groups overriding the shared ones. Copies of one instance count once. Localizer
   frames (ImageType or FrameType value 3 LOCALIZER) are left out; if nothing else remains the
   reason is "localizer".
3. Every remaining frame must share rows/columns, pixel spacing, orientation and frame of
   reference, else "inconsistent ...": a series mixing geometries is broken, not a second
   stack to trust.
4. Stacks: acquisitions (AcquisitionNumber) whose ranges along the normal overlap are separate
   stacks (a re-scan); the one with the most slices is assembled and the others are named in
   the notes; equal largest stacks are ambiguous and rejected. Acquisitions that do not
   overlap (GE writes one per rotation) are one stack. Duplicate positions left in the stack
   are rejected: nothing says which frame is right.
5. Selection policy: Body Part Examined not one of `skip_body_parts` (checked as soon as the
   localizer frames are left out), axial within `axial_tolerance_deg`, at least `min_slices`,
   no slice thicker than `max_slice_thickness_mm`.
6. Size: at most `max_slices` frames in the series (checked before frames are expanded, so a
   header claiming 2^31 frames costs nothing) and at most `max_voxels` voxels, on the grid the
   volume would be assembled on and on the model's 0.8 mm grid over the same extent (an
   absurd pixel spacing makes a small image a huge volume there). Checked on headers alone,
   before any pixel data is decoded or any memory allocated for it.
7. Geometry policy: gantry tilt (slices shifted in-plane along the stack, as GE and Philips
   write tilted series) and irregular spacing (missing slices included) are resampled or
   rejected; a gap wider than `max_gap_factor` times the spacing is always rejected.
"""
