"""CLI sub-commands of stvfm_engine.bench (filled in by the bench work)."""
from __future__ import annotations


def register(sub) -> None:
    """Add this package's sub-commands to the ``stvfm-engine`` parser."""
