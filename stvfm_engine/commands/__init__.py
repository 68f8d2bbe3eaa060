"""The CLI's command groups, one module each with ``register(subparsers)`` (see :mod:`stvfm_engine.cli`)."""
