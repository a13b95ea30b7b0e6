"""The DICOM network edge: C-STORE reception handlers, access control and TLS, the C-STORE
sender."""
