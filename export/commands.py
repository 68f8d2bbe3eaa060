"""CLI sub-commands of stvfm_engine.export (filled in by the export work)."""
from __future__ import annotations


def register(sub) -> None:
    """Add this package's sub-commands to the ``stvfm-engine`` parser."""
