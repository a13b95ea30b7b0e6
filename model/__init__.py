"""Cascaded V-net bone segmentation engine (Kuiper et al. 2022). Knows nothing of DICOM."""
