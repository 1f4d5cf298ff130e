"""A trained model rebuilt from a checkpoint, for evaluation, export and inspection.

Needs nothing of the training loop: the model section of the checkpoint's ``config.yaml``
describes the model, ``model.safetensors`` holds its dense weights and ``memory.zarr`` its
value pools. Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from memray.config import from_dict
from memray.errors import ConfigError, InputError
from memray.model import ModelConfig, Transformer

from . import CONFIG, load_checkpoint
from .pools import STORE


class TrainedModel(NamedTuple):
    model: Transformer
    config: ModelConfig
    checkpoint: Path
    manifest: dict


def read_model_config(ckpt: Path) -> ModelConfig:
    """The model section of a checkpoint's ``config.yaml``, validated."""
    try:
        data = yaml.safe_load((ckpt / CONFIG).read_text())
        return from_dict(ModelConfig, data.get("model", {}), prefix="model")
    except (OSError, AttributeError) as exc:
        raise InputError(f"checkpoint {ckpt}: {CONFIG} cannot be read ({exc})") from None
    except (yaml.YAMLError, ConfigError) as exc:
        raise InputError(f"checkpoint {ckpt}: {CONFIG} is invalid: {exc}") from None


def load_trained_model(path: str | Path) -> TrainedModel:
    """Rebuild the model of a checkpoint (or of a run directory's newest one) on the CPU, in
    eval mode; every file and every chunk read is checked against the manifest first."""
    from .sharded import load_pool_shard, verify_checkpoint

    ckpt, manifest, _, tensors = load_checkpoint(path)
    config = read_model_config(ckpt)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()  # derived buffers (rotary tables); weights are overwritten below
    if not (ckpt / STORE).is_dir():
        raise InputError(f"checkpoint {ckpt}: it has no {STORE} (the value pools)")
    verify_checkpoint(ckpt)
    for name, table in model.value_tables().items():
        arrays = load_pool_shard(ckpt, name, (0, table.num_rows), (0, table.dim), manifest)
        tensors.update({f"pools.{name}.{key}": arrays[key] for key in ("weight", "usage_count", "usage_mass")})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise InputError(
            f"checkpoint {ckpt}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.eval()
    return TrainedModel(model, config, ckpt, manifest)
