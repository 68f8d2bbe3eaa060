"""The C++ embedding (examples/cpp): configure, build and run it on an AOTInductor package, and compare
with Python (<= 1e-5 relative). Only the CPU test lives here; it skips only without cmake or a compiler.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from helpers import CONFIGS, write_checkpoint
from stvfm_engine.engine import Engine, reference_model
from stvfm_engine.export.build import build_engine
from stvfm_engine.export.parity import relative_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "cpp")
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or CXX is None,
                                reason="the C++ example needs cmake and a C++ compiler")

# distilled DeiT (2 prefix tokens), 1 block, time inputs, grid 10x6 not divisible by p=4, C=2
CONFIG = CONFIGS["deit-tiny-distilled-c2-10x6-p4-T4-H2-day12"]


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(engine dir, stvfm_run binary): one AOTInductor build and one CMake build per module. The CMake
    build (a compiler process) runs beside the engine build (mostly Python), about 20 s less on 2 cores."""
    root = tmp_path_factory.mktemp("cpp")
    torch_dir = os.path.dirname(torch.__file__)

    def cmake_build():
        _run(["cmake", "-S", EXAMPLE, "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
              f"-DCMAKE_CXX_COMPILER={CXX}", f"-DTORCH_DIR={torch_dir}",
              f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"])
        _run(["cmake", "--build", str(root / "build"), "-j", "2"])

    with ThreadPoolExecutor(1) as pool:
        compiled = pool.submit(cmake_build)
        write_checkpoint(root / "m.pt", CONFIG, seed=21, mean=[4.0, 7.0], std=[2.0, 3.0])
        engine = build_engine(root / "m.pt", root / "m.engine", backends=["aoti"], max_batch=8, progress=False)
        compiled.result()
    return engine, root / "build" / "stvfm_run"


@pytest.mark.parametrize("batch", [1, 5])
def test_cpp_matches_python(built, tmp_path, batch):
    engine_dir, binary = built
    rng = np.random.default_rng(batch)
    x = (5.0 + 2.5 * rng.standard_normal((batch, CONFIG.history, CONFIG.channels, CONFIG.height, CONFIG.width))).astype(np.float32)
    tod = rng.integers(0, CONFIG.steps_per_day, (batch, CONFIG.history))
    dow = rng.integers(0, 7, (batch, CONFIG.history))
    for name, a in (("x", x), ("tod", tod), ("dow", dow)):
        np.save(tmp_path / f"{name}.npy", a)
    # no LD_LIBRARY_PATH: the binary keeps libtorch loaded for the package's own library
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = _run([str(binary), str(engine_dir / "model.pt2"), str(tmp_path / "y.npy"),
                 *(str(tmp_path / f"{n}.npy") for n in ("x", "tod", "dow"))], env=env)
    assert f"y [{batch}, 2, 2, 10, 6]" in proc.stdout
    y_cpp = np.load(tmp_path / "y.npy")
    assert y_cpp.dtype == np.float32 and y_cpp.shape == (batch, 2, 2, 10, 6)
    y_py = Engine.load(engine_dir, backend="aoti").predict(x, tod, dow)
    assert relative_error(y_cpp, y_py) <= 1e-5
    with torch.inference_mode():
        y_ref = reference_model(engine_dir)(*(torch.from_numpy(a) for a in (x, tod, dow))).numpy()
    assert relative_error(y_cpp, y_ref) <= 1e-4


def test_cpp_reports_bad_input(built, tmp_path):
    engine_dir, binary = built
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.int32))
    proc = subprocess.run([str(binary), str(engine_dir / "model.pt2"), str(tmp_path / "y.npy"), str(tmp_path / "x.npy")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "dtype <i4 unsupported" in proc.stderr
    proc = subprocess.run([str(binary)], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr
