"""Shared test setup: every test is seeded; kernels run on CUDA where it exists, else in Triton's interpreter.

``device`` is the one place tests learn where the Triton kernels run: ``cuda`` on a GPU machine,
``cpu`` (with ``TRITON_INTERPRET=1``, set here before any kernel import) elsewhere. Tests marked
``gpu`` skip with the reason where no CUDA device is usable.
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
# Triton reads this when a kernel is decorated: set it before any stvfm_engine.kernels import.
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
NO_CUDA_REASON = (f"needs a CUDA device: torch {torch.__version__} "
                  + ("is a CPU-only build" if torch.version.cuda is None else "sees none"))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from helpers import ...` (tests/helpers.py)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NYC = SHARED / "data" / "nyc"


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def device() -> str:
    """Where the Triton kernels run in this session: ``cuda`` (compiled) or ``cpu`` (the interpreter)."""
    return "cuda" if CUDA else "cpu"


@pytest.fixture
def nyc_data() -> Path:
    """The folder of the NYC flow grids; skips where ../shared is absent (a user's fresh clone)."""
    if not (NYC / "NYBike_flow_train.npz").is_file():
        pytest.skip(f"real NYC data not found at {NYC} (only present beside the project's CI checkout)")
    return NYC
