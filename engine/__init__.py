"""The runtime: :class:`Engine` loads a built engine directory and serves predictions.

It owns the engine-directory format (manifest, I/O names, precisions), the backend registry and the
backends. ``reference_model(DIR)`` rebuilds the fp32 reference model of an engine directory;
``validate_inputs`` is the input check every ``predict`` runs first.
"""
from stvfm_engine.engine.engine import Engine, choose_backend
from stvfm_engine.engine.inputs import validate_inputs
from stvfm_engine.engine.reference import reference_model
from stvfm_engine.engine.registry import BACKENDS, get_backend
from stvfm_engine.engine.runtime import BackendError

__all__ = ["Engine", "reference_model", "validate_inputs", "choose_backend", "get_backend", "BACKENDS",
           "BackendError"]
