# Everything runs from the project's own virtual environment (.venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Debian packages the tests talk to: dciodvfy checks the DICOM the node writes; DCMTK
# (storescu, echoscu, storescp) and Orthanc are the scanner and PACS the node receives from;
# PostgreSQL is the node's other state database (dicom_node/testbed/postgres.py runs a
# throw-away server). Its server binaries are not on PATH (/usr/lib/postgresql/<version>/bin);
# pg_ctlcluster, from postgresql-common which the server package pulls in, is, so it stands
# for them here. RabbitMQ is the broker of the node as a cluster (dicom_node/testbed/rabbitmq.py
# runs a throw-away one from /usr/lib/rabbitmq/bin; rabbitmq-server, on root's PATH, stands for
# it).
# Node.js and npm (for dcmjs, the OHIF viewer's SEG reader, tests/viewer) come with the
# machine (NodeSource's build, which bundles npm: Debian's npm package would conflict with it).
# chromium and chromium-driver: the browser the dashboard is tested in (selenium drives it
# through chromedriver, nothing downloaded); systemd: systemd-analyze verifies the unit;
# util-linux: setpriv runs the node on port 104 as a user with only CAP_NET_BIND_SERVICE.
APT_PACKAGES := dicom3tools dcmtk orthanc postgresql rabbitmq-server chromium chromium-driver \
	systemd util-linux
APT_BINARIES := dciodvfy storescu Orthanc pg_ctlcluster rabbitmq-server chromium chromedriver \
	systemd-analyze setpriv
APT_STAMP := $(VENV)/.apt-installed
# dcmjs at the version tests/viewer/package-lock.json pins.
VIEWER := tests/viewer
VIEWER_STAMP := $(VIEWER)/node_modules/.installed

.PHONY: install system-deps viewer-deps test lint bench demo serve segment-phantom clean

install: $(STAMP) system-deps viewer-deps

system-deps: $(APT_STAMP)

viewer-deps: $(VIEWER_STAMP)

$(APT_STAMP): Makefile
	@if (for b in $(APT_BINARIES); do command -v $$b >/dev/null || exit 1; done); then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	else echo "warning: install $(APT_PACKAGES) (apt) for the conformance and PostgreSQL tests"; fi
	@mkdir -p $(VENV) && touch $(APT_STAMP)

# Without npm the stamp is not written, so the next `make install` tries again;
# tests/test_viewer.py skips until then.
$(VIEWER_STAMP): $(VIEWER)/package-lock.json $(VIEWER)/package.json | $(APT_STAMP)
	@if command -v npm >/dev/null; then \
		npm ci --prefix $(VIEWER) --no-audit --no-fund && touch $(VIEWER_STAMP); \
	else echo "warning: install Node.js and npm for the viewer test (dcmjs)"; fi

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch ships with the machine; any other version pulls CUDA (DEVELOPERS.md).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install lint
	$(BIN)/python -m pytest -q -ra --durations=15

bench: install
	$(BIN)/python -m bench.inference
	$(BIN)/python -m bench.real_ct
	$(BIN)/python -m bench.phantom_vs_real
	$(BIN)/python -m bench.reception
	$(BIN)/python -m bench.end_to_end
	$(BIN)/python -m bench.load
	$(BIN)/python -m bench.fuzz --cases 5000
	$(BIN)/python -m bench.crash --rounds 20
	$(BIN)/python -m bench.capacity  # from the results above

# The node's main job end to end: phantom CT series -> node (C-STORE) -> SEG at a local PACS
# (Orthanc), with a report (timings per stage, segments in ml, Dice vs truth) and a PNG preview.
demo: install
	$(BIN)/dicom-node demo

# The node with the default config.toml, in the foreground (SIGTERM or Ctrl-C stops it).
serve: install
	$(BIN)/dicom-node serve --config config.toml

# Generates a phantom lower-extremity CT, segments it with the shipped weights, prints Dice.
segment-phantom: install
	$(BIN)/dicom-node segment-phantom --seeds 1001-1003 --size small

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
