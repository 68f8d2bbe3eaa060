"""The fp32 reference model rebuilt from an engine directory (manifest + ``weights.safetensors``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from stvfm_engine.engine.manifest import WEIGHTS_NAME, EngineDirError, read_manifest, verify_files
from stvfm_engine.model.checkpoint import FORMAT_VERSION, model_from_checkpoint
from stvfm_engine.model.stvfm import STVFM


def reference_model(directory: str | os.PathLike, manifest: Optional[dict[str, Any]] = None,
                    verify: bool = True) -> STVFM:
    """The eval-mode fp32 CPU reference model of the engine in ``directory``.

    The manifest's config and normalisation plus the weights file make the same dict a checkpoint
    holds, loaded by :func:`~stvfm_engine.model.checkpoint.model_from_checkpoint`. With ``verify``,
    the weights' sha256 is checked against the manifest first.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    if verify:
        verify_files(directory, manifest, [WEIGHTS_NAME])
    try:
        state = load_file(directory / WEIGHTS_NAME, device="cpu")
    except (OSError, SafetensorError) as e:
        raise EngineDirError(f"{directory}: unreadable {WEIGHTS_NAME} ({e})") from None
    ckpt = {"format_version": FORMAT_VERSION, "config": manifest["config"],
            "normalization": manifest["normalization"], "state_dict": state}
    return model_from_checkpoint(ckpt, source=str(directory))
