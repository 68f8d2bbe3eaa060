"""Checkpoint I/O. A checkpoint is data: a plain dict saved with ``torch.save`` and always read with
``torch.load(weights_only=True)``, so that nothing in a file can run.

Layout (``format_version`` 1)::

    {"format_version": 1,
     "config": {...STVFMConfig as plain types, calendar included (older files: start_dow)...},
     "normalization": {"mean": [C floats], "std": [C floats]},
     "state_dict": {name: tensor, ...},          # full: the frozen backbone included
     "metrics": {...optional plain numbers...}}
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from stvfm_engine.atomic import atomic_path
from stvfm_engine.errors import CheckpointError, ConfigError, first_line
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.model.stvfm import STVFM

FORMAT_VERSION = 1


def checkpoint_dict(model: STVFM, metrics: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    state = {k: v.detach().to("cpu", torch.float32).clone() if v.is_floating_point() else v.detach().cpu().clone()
             for k, v in model.state_dict().items()}
    return {
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "normalization": {"mean": [float(v) for v in model.norm_mean], "std": [float(v) for v in model.norm_std]},
        "state_dict": state,
        "metrics": dict(metrics or {}),
    }


def save_checkpoint(model: STVFM, path: str | os.PathLike, metrics: Optional[dict[str, Any]] = None) -> Path:
    """Write ``model`` as a checkpoint, atomically (temp file beside ``path``, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint_dict(model, metrics), tmp)
    return Path(path)


def check_format(obj: Any, source: Any, kind: str, version: int | dict[int, tuple[str, ...]],
                 required: tuple[str, ...], error: type[Exception]) -> None:
    """The top level of a file read as data: a dict of the expected ``format_version`` with ``required`` keys.

    ``version`` may map each readable format version to its own required keys (``required`` is then unused).
    """
    if not isinstance(obj, dict):
        raise error(f"{source}: expected a {kind} (a JSON object / dict), found {type(obj).__name__}")
    readable = version if isinstance(version, dict) else {version: required}
    found = obj.get("format_version")
    if not isinstance(found, int) or isinstance(found, bool) or found not in readable:
        raise error(f"{source}: unknown {kind} format_version {found!r}; this stvfm-engine reads "
                    + " or ".join(map(str, readable)))
    if missing := [k for k in readable[found] if k not in obj]:
        raise error(f"{source}: {kind} lacks {missing}")


def _not_a_zip(path: Path) -> Optional[str]:
    """None for a file that starts as a zip archive (what torch.save writes), else what it is instead."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return None
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return f"{path.stat().st_size} bytes of another format (starting {head[:8].hex(' ')})"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint dict. Every failure is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found (expected a file written by 'stvfm-engine init' or 'train')")
    if what := _not_a_zip(path):
        raise CheckpointError(f"{path}: not a checkpoint: expected a file written by 'stvfm-engine init' or 'train' "
                              f"(a torch.save zip archive), found {what}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: it holds more than plain data "
                              f"(weights_only=True rejected it: {first_line(e)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError,
            TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch.save file: {first_line(e)})") from None
    check_format(ckpt, path, "checkpoint", FORMAT_VERSION, ("config", "normalization", "state_dict"), CheckpointError)
    if not isinstance(ckpt["state_dict"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values()):
        raise CheckpointError(f"{path}: 'state_dict' must map names to tensors")
    try:
        STVFMConfig.from_dict(ckpt["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: bad config: {e}") from None
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> STVFM:
    """Build the eval-mode fp32 CPU model a checkpoint dict describes."""
    config = STVFMConfig.from_dict(ckpt["config"])
    try:
        with torch.device("meta"):
            model = STVFM(config)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    state = ckpt["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: state_dict does not match the config: missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{'...' if len(unexpected) > 3 else ''}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: shape mismatch for {k}: expected {list(v.shape)}, found {list(state[k].shape)}")
        if state[k].is_floating_point() != v.is_floating_point():
            raise CheckpointError(f"{source}: dtype mismatch for {k}: expected {v.dtype}, found {state[k].dtype}")
    state = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    norm = ckpt["normalization"]
    try:
        model.set_normalization(norm["mean"], norm["std"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: bad normalization: {e}") from None
    model.freeze_backbone()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # pragma: no cover - a model change that forgot a derived tensor
        raise RuntimeError(f"tensors left on the meta device after loading: {leftover[:5]}")
    return model.eval()


def load_model(path: str | os.PathLike) -> STVFM:
    """Load a checkpoint as the eval-mode fp32 reference model on CPU (``weights_only=True``).

    The returned model has ``.config``; the backbone's parameters have ``requires_grad=False`` and
    all others ``True``.
    """
    return model_from_checkpoint(read_checkpoint(path), source=str(path))
