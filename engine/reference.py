"""The fp32 reference model(s) rebuilt from an engine directory: manifest + ``weights.safetensors``, or for a
multi-model directory ``backbone.safetensors`` + each model's own weights file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from stvfm_engine.engine.manifest import WEIGHTS_NAME, is_multi, read_manifest, verify_files
from stvfm_engine.model.checkpoint import FORMAT_VERSION, model_from_checkpoint
from stvfm_engine.model.stvfm import BACKBONE_PREFIX, STVFM
from stvfm_engine.errors import EngineDirError


def _load(directory: Path, name: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(directory / name, device="cpu")
    except (OSError, SafetensorError) as e:
        raise EngineDirError(f"{directory}: unreadable {name} ({e})") from None


def _model(directory: Path, entry: dict[str, Any], state: dict) -> STVFM:
    ckpt = {"format_version": FORMAT_VERSION, "config": entry["config"], "normalization": entry["normalization"],
            "state_dict": state}
    return model_from_checkpoint(ckpt, source=str(directory))


def reference_model(directory: str | os.PathLike, manifest: Optional[dict[str, Any]] = None,
                    verify: bool = True, model: Optional[str] = None) -> STVFM:
    """The eval-mode fp32 CPU reference model of the engine in ``directory`` (of its model ``model`` for a
    multi-model directory; None where it holds one model).

    The manifest's config and normalisation plus the weights make the same dict a checkpoint holds,
    loaded by :func:`~stvfm_engine.model.checkpoint.model_from_checkpoint`. With ``verify``, the
    weights' sha256 is checked against the manifest first.
    """
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    if is_multi(manifest):
        if model is None and len(manifest["models"]) > 1:
            raise EngineDirError(f"{directory} holds {len(manifest['models'])} models {sorted(manifest['models'])}: "
                                 "name the one you want")
        models = reference_models(directory, manifest, verify, [model] if model else None)
        return next(iter(models.values()))
    if verify:
        verify_files(directory, manifest, [WEIGHTS_NAME])
    return _model(directory, manifest, _load(directory, WEIGHTS_NAME))


def reference_models(directory: str | os.PathLike, manifest: Optional[dict[str, Any]] = None, verify: bool = True,
                     names: Optional[Sequence[str]] = None) -> dict[str, STVFM]:
    """The fp32 reference model of each model of a multi-model directory (``names``: only these), all
    running one copy of the backbone (:meth:`~stvfm_engine.model.stvfm.FrozenViT.share_encoder`)."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    entries = manifest["models"]
    names = list(entries) if names is None else list(names)
    if unknown := [n for n in names if n not in entries]:
        raise EngineDirError(f"{directory} holds no model {unknown[0]!r}; it holds {sorted(entries)}")
    backbone_file = manifest["backbone"]["weights"]
    if verify:
        verify_files(directory, manifest, [backbone_file] + [entries[n]["weights"] for n in names])
    backbone = _load(directory, backbone_file)
    models: dict[str, STVFM] = {}
    for name in names:
        own = _load(directory, entries[name]["weights"])
        for file, tensors, inside in ((backbone_file, backbone, True), (entries[name]["weights"], own, False)):
            if stray := next((k for k in tensors if k.startswith(BACKBONE_PREFIX) != inside), None):
                raise EngineDirError(f"{directory}: {file} holds {stray!r}; expected only "
                                     f"{'backbone' if inside else 'non-backbone'} tensors")
        m = _model(directory, entries[name], {**backbone, **own})
        if models:
            m.backbone.share_encoder(next(iter(models.values())).backbone)
        models[name] = m
    return models
