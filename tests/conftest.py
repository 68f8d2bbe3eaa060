"""Shared test setup: every test is seeded; Triton kernels run in the interpreter on a CPU."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Triton reads this when a kernel is decorated: set it before any stvfm_engine.kernels import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from helpers import ...` (tests/helpers.py)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NYC = SHARED / "data" / "nyc"


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def nyc_data() -> Path:
    """The folder of the NYC flow grids; skips where ../shared is absent (a user's fresh clone)."""
    if not (NYC / "NYBike_flow_train.npz").is_file():
        pytest.skip(f"real NYC data not found at {NYC} (only present beside the project's CI checkout)")
    return NYC
