"""The runtime: :class:`Engine` loads a built engine directory and serves predictions."""
