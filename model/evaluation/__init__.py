"""Scoring segmentations: label files against truth, phantoms against their own truth, and
real CT against a bone reference derived by a stated threshold method."""
