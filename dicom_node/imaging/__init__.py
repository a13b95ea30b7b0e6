"""DICOM imaging without network or state: volume assembly from CT instances, the SEG writer
and its codes."""
