"""Helpers shared by the tests: relative error, seeded random inputs, reference outputs, checkpoints.

Relative error is the product's own (:func:`stvfm_engine.export.parity.relative_error`), so a test
judges an output exactly as the build's parity gate does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from stvfm_engine.bench.faults import ServeProcess
from stvfm_engine.engine.precision import get_precision
from stvfm_engine.engine.registry import get_backend
from stvfm_engine.export.parity import relative_error
from stvfm_engine.model.checkpoint import save_checkpoint
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.model.stvfm import build_model

__all__ = ["rel_err", "relative_error", "random_inputs", "reference_output", "write_checkpoint", "why_not_run",
           "one_error_line", "check_reduced", "within", "CONFIGS"]


# every test model's configuration (odd shapes, each backbone family), one row each: add a row there
# rather than a literal in a test file
CONFIGS: dict[str, STVFMConfig] = {name: STVFMConfig(**row) for name, row in
                                   json.loads((Path(__file__).parent / "configs.json").read_text()).items()}


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` in float64, for numpy arrays or torch tensors (any device or dtype)."""
    as_np = (lambda t: t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
    return relative_error(as_np(a), as_np(b))


def random_inputs(model, batch: int, rng: np.random.Generator):
    """Raw-unit inputs around the model's normalisation (never zeros) and, where used, tod/dow."""
    c = model.config
    mean = model.norm_mean.numpy().reshape(1, 1, -1, 1, 1)
    std = model.norm_std.numpy().reshape(1, 1, -1, 1, 1)
    x = (mean + std * rng.standard_normal((batch, c.history, c.channels, c.height, c.width))).astype(np.float32)
    if not c.uses_time:
        return x, None, None
    return x, rng.integers(0, c.steps_per_day, (batch, c.history)), rng.integers(0, 7, (batch, c.history))


def reference_output(model, x, tod, dow) -> np.ndarray:
    """The fp32 reference model on numpy inputs."""
    as_t = [None if a is None else torch.from_numpy(a) for a in (x, tod, dow)]
    with torch.inference_mode():
        return model(*as_t).numpy()


def write_checkpoint(path, config: STVFMConfig, seed: int = 0, mean=None, std=None):
    """A random-weight checkpoint of ``config`` with a non-identity normalisation (``mean``/``std`` per channel)."""
    model = build_model(config, seed=seed)
    c = model.config.channels
    model.set_normalization(torch.linspace(3.0, 9.0, c) if mean is None else mean,
                            torch.linspace(2.0, 5.0, c) if std is None else std)
    save_checkpoint(model, path)
    return path


def check_reduced(err: float, precision: str, floor: float = 1e-6) -> float:
    """The one low-precision comparison: a reduced-precision output must be really reduced (its relative
    error above ``floor``: not an fp32 path in disguise) and within the precision's parity tolerance (the
    registry's, :data:`stvfm_engine.engine.precision.PRECISIONS`). Returns ``err``."""
    tol = get_precision(precision).tolerance
    assert floor < err <= tol, f"{precision}: relative error {err:.3g} is not in ({floor:g}, {tol:g}]"
    return err


def within(err: float, precision: str) -> bool:
    """``err`` within ``precision``'s parity tolerance."""
    return err <= get_precision(precision).tolerance


def why_not_run(backend: str, device: str) -> Optional[str]:
    """The registry's answer: None when ``backend`` runs on ``device`` here, else why not."""
    return get_backend(backend).why_not_run(device)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (bound to port 0 together, then released)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServerProcess(ServeProcess):
    """``stvfm-engine serve ARGS`` in a subprocess for a test: the bench's process wrapper (stderr kept in a
    file, every process it starts found through /proc and sampled), with the tests' idioms: ``args`` start
    with ``serve``; ``stop()`` returns the exit code and leaves the processes it had to kill in ``leftovers``."""

    def __init__(self, args: list[str]):
        assert args[0] == "serve", args
        super().__init__(args[1:])
        self.leftovers: list[int] = []

    def wait_ready(self, timeout_s: float) -> None:
        super().wait_ready(timeout_s)
        self.family.update(self._tree())

    def descendants(self) -> list[int]:
        """This process and all its live descendants."""
        return self._tree()

    def stop(self, timeout_s: float = 20.0) -> int:  # type: ignore[override]
        code, self.leftovers = super().stop(timeout_s)
        return code


def setter(path: list, value):
    """``change(obj)`` that sets ``obj[path[0]]...[path[-1]] = value`` (a nested JSON document edited in place)."""
    def change(obj):
        node = obj
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


def one_error_line(err: str, command: str) -> str:
    """The one line a failed CLI command writes on stderr (asserted to be exactly one, without a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stvfm-engine {command}: error: ") and "Traceback" not in err, err
    return lines[0]
