"""The DIMSE status codes the node answers and checks (PS3.4 Annex B.2.3, PS3.7 Annex C).

pynetdicom's `Status` names only the general ones (success, pending, cancel), so the Storage
Service's failures the node sends are named here, once."""

from __future__ import annotations

from pynetdicom.status import Status

SUCCESS = int(Status.SUCCESS)
# Refused, out of resources: could not store (disk full or below node.min_free_mb, database).
OUT_OF_RESOURCES = 0xA700
# Error, cannot understand: could not make sense of the dataset.
CANNOT_UNDERSTAND = 0xC000
