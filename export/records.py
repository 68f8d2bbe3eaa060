"""What a build records and opens before its manifest is written: the manifest's common head, a model's
record, and the engine being built as :func:`~stvfm_engine.engine.session.open_session` opens it (its gates
and ``--precision auto`` timing run through the runtime's one session path)."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional

from stvfm_engine.engine.graph import io_spec
from stvfm_engine.engine.manifest import FORMAT_VERSION, library_versions
from stvfm_engine.engine.precision import Precision
from stvfm_engine.engine.registry import BuildContext
from stvfm_engine.engine.session import Built
from stvfm_engine.model.stvfm import STVFM
from stvfm_engine.version import __version__


def manifest_head(format_version: int, precision: Precision, device: str, max_batch: int) -> dict:
    """The fields every manifest starts with (the builder adds what it built)."""
    return {"format_version": format_version, "stvfm_engine_version": __version__,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "precision": precision.name, "device": device, "max_batch": max_batch, "versions": library_versions()}


def model_record(model: STVFM, checkpoint: dict, max_batch: int) -> dict:
    """What a manifest records of one model: its checkpoint, config, normalisation and I/O."""
    return {"checkpoint": checkpoint, "config": model.config.to_dict(),
            "normalization": {"mean": model.norm_mean.tolist(), "std": model.norm_std.tolist()},
            "io": io_spec(model.config, max_batch)}


def built_engine(ctx: BuildContext, backends: dict, directory: Optional[Path] = None) -> Built:
    """The engine being built, as :func:`open_session` opens it before its manifest is written: the
    artifacts of ``backends`` (name -> manifest entry) in ``directory`` (default: the build's), the
    reference model the build holds."""
    model = ctx.model
    manifest = {**manifest_head(FORMAT_VERSION, ctx.precision, ctx.device, ctx.max_batch),
                **model_record(model, {}, ctx.max_batch), "backends": backends}
    return Built(directory or ctx.directory, manifest, references=lambda: {"model": model})
