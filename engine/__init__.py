"""The runtime: :class:`Engine` loads a built engine directory and serves predictions.

It owns the engine-directory format (manifest, I/O names, precisions), the backend registry and the
backends. :func:`open_session` (:mod:`.session`) is the one way to open, check and run a model, which
``Engine`` wraps; ``reference_model(DIR)`` rebuilds the fp32 reference model of an engine directory.
"""
from stvfm_engine.engine.engine import Engine
from stvfm_engine.engine.inputs import validate_inputs  # the rules Session.check applies (kept importable)
from stvfm_engine.engine.reference import reference_model
from stvfm_engine.engine.registry import BACKENDS, get_backend
from stvfm_engine.engine.session import Session, choose_backend, open_session
from stvfm_engine.errors import BackendError

__all__ = ["Engine", "Session", "open_session", "reference_model", "choose_backend", "get_backend", "BACKENDS",
           "BackendError", "validate_inputs"]
