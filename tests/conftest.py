"""Shared test setup: every test is seeded; kernels run on CUDA where it exists, else in Triton's interpreter.

``device`` is the one place tests learn where the Triton kernels run: ``cuda`` on a GPU machine,
``cpu`` (with ``TRITON_INTERPRET=1``, set here before any kernel import) elsewhere. Tests marked
``gpu`` skip with the reason where no CUDA device is usable.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
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


# ----------------------------------------------------------------------------- PostgreSQL
def _pg_bin(name: str):
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).is_file():
            return str(root / name)
    return None


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own: initdb into a temp dir, on a free loopback port, as a non-root user."""
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'stvfm-engine[streams]')")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="stvfm-pg-"))
    user = {}
    if os.geteuid() == 0:  # the server refuses to run as root
        import pwd

        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and no 'nobody' user to run PostgreSQL as")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        user = {"user": nobody.pw_uid, "group": nobody.pw_gid}
    from helpers import free_ports

    data, port = root / "data", free_ports(1)[0]
    env = {**os.environ, "LC_ALL": "C"}
    run = (lambda *args: subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=root, **user))
    r = run(initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    r = run(pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    if r.returncode != 0:
        log = (root / "log").read_text(errors="replace").strip().splitlines() if (root / "log").exists() else []
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {(log or [r.stderr.strip()])[-1]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop")
        shutil.rmtree(root, ignore_errors=True)
