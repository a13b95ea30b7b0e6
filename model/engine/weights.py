"""Model weights and training checkpoints as safetensors + JSON: nothing is ever unpickled."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.engine.network import CascadeConfig, CascadedVNet

WEIGHTS_DIR = Path(__file__).parents[1] / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "cascade_128-64-32.safetensors"
MODEL_NAME = "cascaded-vnet-lower-extremity"


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_weights(model: CascadedVNet, path: Path, metadata: dict[str, Any]) -> None:
    """Weights to `path` (.safetensors) and the config + metadata to its .json sidecar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(model.state_dict()), str(path))
    doc = {"name": MODEL_NAME, "config": model.config.to_json(), **metadata}
    doc["weights_sha256"] = file_sha256(path)
    sidecar(path).write_text(json.dumps(doc, indent=2) + "\n")


def load_weights(path: Path = DEFAULT_WEIGHTS) -> tuple[CascadedVNet, dict[str, Any]]:
    """The model in eval mode and its sidecar metadata; refuses weights whose hash differs."""
    path = Path(path)
    meta_path = sidecar(path)
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"model weights need {path} and {meta_path}")
    meta = json.loads(meta_path.read_text())
    actual = file_sha256(path)
    if meta.get("weights_sha256") != actual:
        raise ValueError(f"{path}: sha256 {actual} differs from weights_sha256 in {meta_path}")
    model = CascadedVNet(CascadeConfig.from_json(meta["config"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), meta


def save_checkpoint(
    path: Path, model: CascadedVNet, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """A resumable training state: model and Adam moments as tensors, the rest as JSON.

    Written to temporary names and renamed, so an interrupted save leaves the last one intact.
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    doc = {"config": model.config.to_json(), "param_groups": opt["param_groups"], **state}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(_contiguous(tensors), str(tmp))
    sidecar(tmp).write_text(json.dumps(doc) + "\n")
    tmp.replace(path)
    sidecar(tmp).replace(sidecar(path))


def load_checkpoint(
    path: Path, model: CascadedVNet, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restores model and optimizer from `path`; returns the JSON state saved with them."""
    tensors = load_file(str(path))
    doc = json.loads(sidecar(path).read_text())
    if doc["config"] != model.config.to_json():
        raise ValueError(f"{path}: checkpoint config {doc['config']} differs from the model's")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    return {k: v for k, v in doc.items() if k not in ("config", "param_groups")}
