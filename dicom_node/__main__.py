"""`python -m dicom_node` is the `dicom-node` command."""

from dicom_node.app.cli import main

raise SystemExit(main())
