"""The runtime: :class:`Engine` loads a built engine directory and serves predictions.

``reference_model(DIR)`` rebuilds the fp32 reference model of an engine directory;
``validate_inputs`` is the input check every ``predict`` runs first.
"""
from stvfm_engine.engine.backends import BACKENDS, BackendError, run_status
from stvfm_engine.engine.engine import Engine, choose_backend
from stvfm_engine.engine.inputs import validate_inputs
from stvfm_engine.engine.reference import reference_model

__all__ = ["Engine", "reference_model", "validate_inputs", "choose_backend", "run_status", "BACKENDS", "BackendError"]
