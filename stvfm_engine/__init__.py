"""stvfm-engine: an optimized inference engine for ST-VFM spatio-temporal forecasting models.

Public API: :func:`load_model` (a checkpoint -> the fp32 reference model), :class:`Engine`
(a built engine directory -> fast predictions), :class:`Streams` (forecast streams over an engine),
``__version__``.
"""
from __future__ import annotations

from stvfm_engine.model.checkpoint import load_model, save_checkpoint
from stvfm_engine.version import __version__


def __getattr__(name: str):
    # Engine and Streams pull in the backends' runtimes; import them only when asked for.
    if name == "Engine":
        from stvfm_engine.engine import Engine

        return Engine
    if name == "Streams":
        from stvfm_engine.engine.streams import Streams

        return Streams
    raise AttributeError(f"module 'stvfm_engine' has no attribute {name!r}")


__all__ = ["load_model", "save_checkpoint", "Engine", "Streams", "__version__"]
