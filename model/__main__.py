"""`python -m model` is the `dicom-node-model` command."""

from model.cli import main

raise SystemExit(main())
