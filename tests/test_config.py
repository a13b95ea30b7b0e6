"""config.toml: the shipped default loads; typos and bad values are named, never ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads() -> None:
    config = load_config(ROOT / "config.toml")
    assert config.inference.strategy == "fast"
    assert config.node.ae_title == "BONESEG" and config.node.allowed_calling_aets == ()
    assert config.series.complete_after_s == 20 and config.series.min_slices == 20


def test_node_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "config.toml"
    path.parent.mkdir()
    path.write_text("[node]\ndata_dir = '../var'\nallowed_calling_aets = ['PACS', 'CT1']\n")
    node = load_config(path).node
    assert node.data_path == tmp_path / "var"
    assert node.database_url == f"sqlite:///{tmp_path / 'var' / 'node.db'}"
    assert node.allowed_calling_aets == ("PACS", "CT1")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[inference]\nstrategi = 'fast'\n", "inference.strategi"),
        ("[inference]\nstrategy = 'quick'\n", "inference.strategy"),
        ("[inference]\nthreads = 'two'\n", "inference.threads"),
        ("[inference]\ndevice = 'tpu'\n", "inference.device"),
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
        ("[node]\nbind_address = '0.0.0.0'\n", "node.bind_address"),
        ("[series]\ncomplete_after_s = -1\n", "series.complete_after_s"),
        ("[series]\nmin_slices = 0\n", "series.min_slices"),
        ("[series]\ngantry_tilt = 'ignore'\n", "series.gantry_tilt"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)
