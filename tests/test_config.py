"""config.toml: the shipped default loads; typos and bad values are named, never ignored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.app.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads() -> None:
    config = load_config(ROOT / "config.toml")
    assert config.verdict.policy == "unverified"
    assert config.inference.strategy == "fast"
    assert config.node.ae_title == "BONESEG" and config.node.allowed_calling_aets == ()
    assert config.series.complete_after_s == 20 and config.series.min_slices == 20


def test_loading_the_config_does_not_import_simpleitk() -> None:
    """The config takes the assembly policy from its own light module, not from the volume
    assembly that needs SimpleITK; a fresh interpreter, since this one has imported it."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from dicom_node.app.config import load_config\n"
        f"load_config(Path({str(ROOT / 'config.toml')!r}))\n"
        "assert 'SimpleITK' not in sys.modules, 'loading the config imported SimpleITK'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_node_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "config.toml"
    path.parent.mkdir()
    path.write_text("[node]\ndata_dir = '../var'\nallowed_calling_aets = ['PACS', 'CT1']\n")
    node = load_config(path).node
    assert node.data_path == tmp_path / "var"
    assert node.database_url == f"sqlite:///{tmp_path / 'var' / 'node.db'}"
    assert node.allowed_calling_aets == ("PACS", "CT1")


_CLUSTER = "broker = 'amqp://guest:guest@mq//'\nshared_dir = 'shared'\n"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[inference]\nstrategi = 'fast'\n", "inference.strategi"),
        ("[inference]\nstrategy = 'quick'\n", "inference.strategy"),
        ("[inference]\nthreads = 'two'\n", "inference.threads"),
        ("[inference]\ndevice = 'tpu'\n", "inference.device"),
        ("[inference]\nprecision = 'half'\n", "inference.precision"),
        ("[inferense]\n", "inferense"),
        ("[inference\n", "not valid TOML"),
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\nport = '11112'\n", "node.port"),
        ("[node]\nae_title = 'A_TITLE_TOO_LONG_'\n", "node.ae_title"),
        ("[node]\nae_title = 'BONE\\\\SEG'\n", "node.ae_title"),
        ("[node]\nallowed_calling_aets = 'PACS'\n", "node.allowed_calling_aets"),
        ("[node]\nallowed_calling_aets = ['PACS', 7]\n", "node.allowed_calling_aets"),
        ("[node]\nmax_associations = 0\n", "node.max_associations"),
        ("[node]\ndatabase = 'mysql://x'\n", "node.database"),
        ("[node]\nmin_free_mb = -1\n", "node.min_free_mb"),
        ("[node]\nmin_free_mb = 1.5\n", "node.min_free_mb"),
        ("[series]\nmin_slices = 1\n", "series.min_slices"),
        ("[series]\nmax_slices = 10\n", "series.max_slices"),
        ("[series]\nmax_voxels = 0\n", "series.max_voxels"),
        ("[node]\nbind_address = '0.0.0.0'\n", "node.bind_address"),
        ("[node]\nallowed_peer_addresses = '10.0.0.0/8'\n", "node.allowed_peer_addresses"),
        ("[node]\nallowed_peer_addresses = ['pacs.local']\n", "node.allowed_peer_addresses"),
        ("[node]\nallowed_peer_addresses = ['10.1.2.3/16']\n", "node.allowed_peer_addresses"),
        ("[node]\nallowed_peer_addresses = ['10.0.0.0/33']\n", "node.allowed_peer_addresses"),
        ("[node]\nnetwork_timeout_s = 0\n", "node.network_timeout_s"),
        ("[node]\nacse_timeout_s = -1\n", "node.acse_timeout_s"),
        ("[node]\ndimse_timeout_s = inf\n", "node.dimse_timeout_s"),
        ("[node]\nnetwork_timeout_s = nan\n", "node.network_timeout_s"),
        ("[node]\nacse_timeout_s = '30'\n", "node.acse_timeout_s"),
        ("[node]\ntls_certificate = 'node.pem'\n", "node.tls_private_key"),
        ("[node]\ntls_private_key = 'node.key'\n", "node.tls_certificate"),
        ("[node]\ntls_ca_certificates = 'ca.pem'\n", "node.tls_ca_certificates"),
        ("[node]\ntls_require_client_certificate = true\n", "node.tls_require_client_certificate"),
        ("[node]\ntls_require_client_certificate = 'yes'\n", "node.tls_require_client_certificate"),
        ("[series]\ncomplete_after_s = -1\n", "series.complete_after_s"),
        ("[series]\nmin_slices = 0\n", "series.min_slices"),
        ("[series]\ngantry_tilt = 'ignore'\n", "series.gantry_tilt"),
        ("[verdict]\npolicy = 'review'\n", "verdict.policy: expected 'send', 'unverified'"),
        ("[verdict]\npolicy = 1\n", "verdict.policy"),
        ("[verdict]\nunsure = 'hold'\n", "verdict.unsure: unknown key"),
        ("[cluster]\nenabled = true\nshared_dir = '/mnt/x'\n", "cluster.broker"),
        ("[cluster]\nenabled = true\nbroker = 'amqp://h//'\n", "cluster.shared_dir"),
        ("[cluster]\nnode_id = 'recv 1'\n", "cluster.node_id"),
        ("[cluster]\nlease_s = 0\n", "cluster.lease_s"),
        (f"[cluster]\nenabled = true\n{_CLUSTER}", "node.database: a cluster shares"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)


PACS = "[[destinations]]\nname = 'pacs'\nae_title = 'ORTHANC'\nhost = '127.0.0.1'\nport = 4242\n"


def test_destinations_and_processing_sections_load(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        PACS
        + PACS.replace("'pacs'", "'caller'")
        + "reply_to_caller = true\n"
        + "[delivery]\nmax_attempts = 3\n[worker]\ntimeout_s = 60\n[seg]\nseries_number = 77\n"
        + "[verdict]\npolicy = 'hold'\n"
    )
    config = load_config(path)
    assert config.verdict.policy == "hold"
    assert [d.name for d in config.destinations] == ["pacs", "caller"]
    assert config.destinations[1].reply_to_caller and not config.destinations[0].reply_to_caller
    assert (config.delivery.max_attempts, config.worker.timeout_s) == (3, 60.0)
    assert config.seg.series_number == 77 and config.retention.delete_after_h == 168
    assert config.destination("caller").port == 4242
    with pytest.raises(ConfigError, match="no destination 'archive' \\(known: pacs, caller\\)"):
        config.destination("archive")


def _pem_files(folder: Path, *names: str) -> None:
    """Files that exist (load_config checks that much; their content is checked at start)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("-----BEGIN CERTIFICATE-----\n")


def test_tls_paths_are_relative_to_the_config_file_and_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "config.toml"
    _pem_files(tmp_path / "etc" / "tls", "node.pem", "node.key", "ca.pem")
    node_tls = (
        "[node]\ntls_certificate = 'tls/node.pem'\ntls_private_key = 'tls/node.key'\n"
        "tls_ca_certificates = 'tls/ca.pem'\ntls_require_client_certificate = true\n"
        "allowed_peer_addresses = ['10.1.0.0/16', '192.168.7.7', 'fd00::/8']\n"
        "network_timeout_s = 5\nacse_timeout_s = 2.5\n"
    )
    path.write_text(node_tls + PACS + "tls = true\ntls_ca_certificates = 'tls/ca.pem'\n")
    config = load_config(path)
    node, (pacs,) = config.node, config.destinations
    assert node.tls and node.tls_certificate == str(tmp_path / "etc" / "tls" / "node.pem")
    assert node.tls_require_client_certificate
    assert (node.network_timeout_s, node.acse_timeout_s, node.dimse_timeout_s) == (5, 2.5, 30)
    assert [str(n) for n in node.allowed_peer_networks] == [
        "10.1.0.0/16",
        "192.168.7.7/32",
        "fd00::/8",
    ]
    assert pacs.tls and pacs.tls_ca_certificates == str(tmp_path / "etc" / "tls" / "ca.pem")

    (tmp_path / "etc" / "tls" / "node.key").unlink()
    with pytest.raises(ConfigError, match=r"node\.tls_private_key: no such file: .*node\.key"):
        load_config(path)
    path.write_text(PACS + "tls = true\ntls_ca_certificates = 'missing.pem'\n")
    with pytest.raises(ConfigError, match=r"destinations\[pacs\]\.tls_ca_certificates: no such"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (PACS.replace("port = 4242", "port = 0"), r"destinations\[pacs\]\.port"),
        (PACS.replace("ae_title = 'ORTHANC'\n", ""), r"destinations\.ae_title: required"),
        (PACS.replace("'ORTHANC'", "'A_TITLE_TOO_LONG_'"), r"destinations\[pacs\]\.ae_title"),
        (PACS + "colour = 'red'\n", r"destinations\.colour: unknown key"),
        (PACS + PACS, r"destinations\.name: names must be unique"),
        ("[delivery]\nmax_attempts = 0\n", r"delivery\.max_attempts"),
        ("[delivery]\nbackoff_initial_s = 100\nbackoff_max_s = 10\n", r"delivery\.backoff"),
        ("[delivery]\njitter = 2\n", r"delivery\.jitter"),
        ("[worker]\ntimeout_s = 0\n", r"worker\.timeout_s"),
        ("[seg]\nseries_description = ''\n", r"seg\.series_description"),
        ("[retention]\ndelete_after_h = -1\n", r"retention\.delete_after_h"),
        ("destinations = 'pacs'\n", r"destinations: expected \[\[destinations\]\]"),
        (PACS + "tls = 'yes'\n", r"destinations\.tls: expected bool"),
        (
            PACS + "tls_ca_certificates = 'ca.pem'\n",
            r"destinations\[pacs\]\.tls_ca_certificates: set",
        ),
        (
            PACS + "tls = true\ntls_certificate = 'c.pem'\n",
            r"destinations\[pacs\]\.tls_private_key",
        ),
    ],
)
def test_bad_destination_or_processing_value_is_named(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_cluster_section_loads_with_shared_dir_relative_to_the_config_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.toml"
    database = "[node]\ndatabase = 'postgresql+psycopg://u@db/n'\n"
    path.write_text(f"{database}[cluster]\nenabled = true\nnode_id = 'w-1'\n{_CLUSTER}")
    cluster = load_config(path).cluster
    assert (cluster.enabled, cluster.owner, cluster.lease_s) == (True, "w-1", 30.0)
    assert cluster.shared_dir == str(tmp_path / "shared")
    assert load_config(ROOT / "config.toml").cluster.enabled is False  # one machine: default


@pytest.mark.parametrize("role", [None, "worker"])
def test_serve_role_and_cluster_go_together(tmp_path: Path, role: str | None) -> None:
    """--role without [cluster] enabled, or a cluster's process without --role, is refused
    before anything starts."""
    path = tmp_path / "config.toml"
    if role is None:
        database = "[node]\ndatabase = 'postgresql+psycopg://u@db/n'\n"
        path.write_text(f"{database}[cluster]\nenabled = true\n{_CLUSTER}")
    else:
        path.write_text("[node]\ndata_dir = 'var'\n")
    command = [sys.executable, "-m", "dicom_node", "serve", "--config", str(path)]
    command += ["--role", role] if role else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert "serve --role: receive or worker with [cluster] enabled = true" in result.stderr
    assert not (tmp_path / "var").exists()
