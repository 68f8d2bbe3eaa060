"""One module per backend: its runner (``open``) and, for an artifact backend, its build step.

Each is described by one record in :mod:`stvfm_engine.engine.registry`; nothing imports these modules
by name except through that registry.
"""
