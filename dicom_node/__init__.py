"""DICOM segmentation node: receives CT, segments the bones, returns DICOM SEG."""

__version__ = "0.1.0"
