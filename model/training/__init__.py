"""Training the cascade: CT synthesis from tissue maps, multi-scale patch sampling and the
resumable, deep-supervised training loop."""
