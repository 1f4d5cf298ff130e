"""Checkpoints: weights in safetensors and Zarr (no pickle), the config in YAML.

Layout of ``RUN/checkpoints/step-XXXXXXXX/``: ``model.safetensors`` (dense weights),
``optimizer.safetensors`` (their Adam moments), ``config.yaml``, ``memory.zarr/`` (the value
pools, written shard by shard: ``sharded.py``), and ``COMMITTED`` (JSON: step, time, sha256 of
every file and chunk), written last. A checkpoint is written into a temporary sibling, fsynced
and renamed, so a crash never leaves a half-written directory that readers take for a
checkpoint; readers ignore directories without ``COMMITTED``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from memray.errors import InputError
from memray.files import fsync as _fsync
from memray.files import sha256_file as _sha256

COMMITTED = "COMMITTED"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def begin_checkpoint(root: Path, step: int, fresh: bool) -> Path:
    """The temporary sibling a checkpoint is written into (emptied when ``fresh``)."""
    root = Path(root)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if fresh:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    return tmp


def commit_checkpoint(root: Path, tmp: Path, step: int, files: dict[str, str], keep_last: int = 0, **extra) -> Path:
    """fsync every file, write ``COMMITTED`` (the manifest: ``files`` and ``extra``) last, rename."""
    root = Path(root)
    final = root / checkpoint_name(step)
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            _fsync(path)
    manifest = {"step": step, "time": time.time(), "files": files, **extra}
    (tmp / COMMITTED).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / COMMITTED)
    if final.exists():  # re-saving a step replaces it only once the new copy is complete
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    if keep_last > 0:
        for old in committed_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    return final


def committed_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / COMMITTED).is_file())


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest committed one under a run directory."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint not found: {path}")
    if (path / COMMITTED).is_file():
        return path
    if (path / WEIGHTS).exists():
        raise InputError(f"checkpoint {path} is not committed (no {COMMITTED} file): it was never completed")
    for root in (path / "checkpoints", path):
        found = committed_checkpoints(root)
        if found:
            return found[-1]
    raise InputError(f"no committed checkpoint in {path}")


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    """(checkpoint dir, its ``COMMITTED`` manifest): ``files`` (and ``chunks``) checked for shape."""
    ckpt = find_checkpoint(path)
    try:
        manifest = json.loads((ckpt / COMMITTED).read_text())
        if not isinstance(manifest["files"], dict) or not isinstance(manifest.get("chunks", {}), dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise InputError(f"checkpoint {ckpt}: {COMMITTED} is not a valid manifest") from None
    return ckpt, manifest


def load_checkpoint(path: str | Path) -> tuple[Path, dict, str, dict[str, torch.Tensor]]:
    """(checkpoint dir, manifest, config YAML text, tensors); checksums verified first."""
    ckpt, manifest = read_manifest(path)
    files = manifest["files"]
    for name in (WEIGHTS, CONFIG):
        if name not in files:
            raise InputError(f"checkpoint {ckpt}: manifest lists no {name}")
        if not (ckpt / name).is_file():
            raise InputError(f"checkpoint {ckpt}: {name} is missing")
        if _sha256(ckpt / name) != files[name]:
            raise InputError(f"checkpoint {ckpt}: {name} is damaged (checksum mismatch)")
    try:
        tensors = load_file(str(ckpt / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise InputError(f"checkpoint {ckpt}: cannot read {WEIGHTS}: {exc}") from None
    return ckpt, manifest, (ckpt / CONFIG).read_text(), tensors
