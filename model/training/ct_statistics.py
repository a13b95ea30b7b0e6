"""What a CT's tissues read in HU, measured without labels (pure numpy): used to match the
subject phantoms' synthesis to the real extremity scans (`bench.phantom_vs_real`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BONE_HU = 200.0


def histogram_peak(values: np.ndarray, lo: float, hi: float, bin_hu: float = 2.0) -> float:
    """The most frequent value in [lo, hi) (centre of the fullest bin of width ``bin_hu``)."""
    counts, edges = np.histogram(values, bins=round((hi - lo) / bin_hu), range=(lo, hi))
    i = int(counts.argmax())
    return float((edges[i] + edges[i + 1]) / 2)


def tissue_statistics(hu: np.ndarray) -> dict[str, float]:
    """Fat and muscle (histogram peaks in -180..-40 and 0..150 HU), bone (90th percentile of
    voxels >= 200 HU), the medullary canal (median inside bone filled per axial slice, away
    from the bone itself) and noise (median in-plane 3x3 standard deviation in muscle-like
    voxels) of a CT volume (z, y, x)."""
    hu = hu.astype(np.float32)
    bone = hu >= BONE_HU
    filled = np.stack([ndimage.binary_fill_holes(plane) for plane in bone])
    canal = filled & ~ndimage.binary_dilation(bone, iterations=1)
    mean = ndimage.uniform_filter(hu, (1, 3, 3))
    sd = np.sqrt(np.maximum(ndimage.uniform_filter(hu * hu, (1, 3, 3)) - mean * mean, 0.0))
    muscle_like = (mean > 30) & (mean < 80) & (sd < 60)
    return {
        "fat_hu": histogram_peak(hu, -180.0, -40.0),
        "muscle_hu": histogram_peak(hu, 0.0, 150.0),
        "bone_p90_hu": float(np.percentile(hu[bone], 90)) if bone.any() else float("nan"),
        "canal_hu": float(np.median(hu[canal])) if canal.any() else float("nan"),
        "noise_hu": float(np.median(sd[muscle_like])) if muscle_like.any() else float("nan"),
    }
