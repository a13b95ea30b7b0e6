"""The node's configuration (config.toml): typed sections, validated at start.

Unknown sections or keys and values of the wrong type are rejected with a message naming the
key, so a typo never silently falls back to a default.

Callers import from here. The sections live by theme:
- `network`: what faces the network: [node], [[destinations]], [http];
- `pipeline`: what the node does with a series: [series], [inference], [worker], [seg],
  [measurements], [verdict], [delivery], [retention];
- `load`: `Config` (every section, [log] from `dicom_node.logs` among them) and the loaders;
- `cluster`: [cluster], reception nodes and workers on several machines;
- `checks`: `ConfigError` and the value checks the sections share.

Loading stays light: no SimpleITK (tests/test_config.py checks it), torch or SQLAlchemy.
"""

from __future__ import annotations

from dicom_node.app.config.checks import ConfigError
from dicom_node.app.config.cluster import ClusterConfig
from dicom_node.app.config.load import (
    Config,
    load_assembly_policy,
    load_config,
    load_inference_config,
)
from dicom_node.app.config.network import Destination, HttpConfig, IPNetwork, NodeConfig
from dicom_node.app.config.pipeline import (
    MEASUREMENT_NAMES,
    DeliveryConfig,
    InferenceConfig,
    MeasurementsConfig,
    RetentionConfig,
    SegConfig,
    SeriesConfig,
    UnsurePolicy,
    VerdictConfig,
    WorkerConfig,
)
from dicom_node.logs import LogConfig  # [log], beside the formats it picks

__all__ = [
    "MEASUREMENT_NAMES",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "Destination",
    "HttpConfig",
    "IPNetwork",
    "InferenceConfig",
    "LogConfig",
    "MeasurementsConfig",
    "NodeConfig",
    "RetentionConfig",
    "SegConfig",
    "SeriesConfig",
    "UnsurePolicy",
    "VerdictConfig",
    "WorkerConfig",
    "load_assembly_policy",
    "load_config",
    "load_inference_config",
]
