"""config.toml: the shipped default loads; typos and bad values are named, never ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads() -> None:
    config = load_config(ROOT / "config.toml")
    assert config.inference.strategy == "fast"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[inference]\nstrategi = 'fast'\n", "inference.strategi"),
        ("[inference]\nstrategy = 'quick'\n", "inference.strategy"),
        ("[inference]\nthreads = 'two'\n", "inference.threads"),
        ("[inference]\ndevice = 'tpu'\n", "inference.device"),
        ("[inferense]\n", "inferense"),
        ("[inference\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)
