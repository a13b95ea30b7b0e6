"""Hostile DICOM input, and a sender that puts it on the wire exactly as built.

Shared by tests/test_hostile.py (a few hundred cases in `make test`) and bench/fuzz.py
(thousands in `make bench`). Hypothesis draws a `Spec` (`strategies`: which mutation, where,
with what); `build` (`mutation`) turns it into a `Case`: the encoded dataset of one hostile
instance, the claims of its C-STORE request (SOP class, SOP instance UID, transfer syntax)
and, for some cases, the valid slices of the series it hides in, so that it also reaches
selection and the worker. `HostileSender` (`sender`) puts each on the wire; `inspect_node`
(`inspection`) compares what the node then holds with what it acknowledged.

Hostile UIDs carry the marker `fuzzcanary`, so a test can look for any file or folder a
path-like UID (`../`, `/`, NUL) might have made the node create.
"""

from tests.support.hostile.cases import CANARY, PATIENT, SLICES, Case, Encoded, Spec
from tests.support.hostile.inspection import NodeReport, canaries, inspect_node, tree
from tests.support.hostile.mutation import build, deflate_bomb
from tests.support.hostile.sender import (
    NO_ANSWER,
    UNSENDABLE,
    HostileSender,
    allowed_answers,
    as_received,
)
from tests.support.hostile.strategies import KINDS, UNDECODABLE_REQUEST_UIDS, specs

__all__ = [
    "CANARY",
    "KINDS",
    "NO_ANSWER",
    "PATIENT",
    "SLICES",
    "UNDECODABLE_REQUEST_UIDS",
    "UNSENDABLE",
    "Case",
    "Encoded",
    "HostileSender",
    "NodeReport",
    "Spec",
    "allowed_answers",
    "as_received",
    "build",
    "canaries",
    "deflate_bomb",
    "inspect_node",
    "specs",
    "tree",
]
