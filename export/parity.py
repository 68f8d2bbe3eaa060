"""The parity gate: a built backend must match the fp32 reference on fresh random inputs.

Inputs are drawn from a fresh seed per build (recorded), at batch 1 and a larger odd batch, and go
through the opened session's ``predict`` (its one input check, then its one scheduler), the path
``Engine.predict`` takes. The error is ``||y - y_ref|| / ||y_ref||``.
"""
from __future__ import annotations

import secrets
from typing import Any, Callable

import numpy as np
import torch

from stvfm_engine.engine.graph import example_inputs
from stvfm_engine.engine.precision import Precision
from stvfm_engine.errors import ParityError
from stvfm_engine.model.stvfm import STVFM


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    """``||y - ref|| / ||ref||`` in float64 (inf when ``y`` is not finite)."""
    y64, ref64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if y64.shape != ref64.shape:
        raise ParityError(f"output shape {list(y64.shape)} differs from the reference's {list(ref64.shape)}")
    if not np.isfinite(y64).all():
        return float("inf")
    return float(np.linalg.norm(y64 - ref64) / max(np.linalg.norm(ref64), 1e-30))


def parity_batches(max_batch: int) -> list[int]:
    """Batch 1 and a larger odd batch (5, or the largest odd one the engine accepts)."""
    big = min(5, max_batch if max_batch % 2 else max_batch - 1)
    return [1] if big <= 1 else [1, big]


def check_parity(name: str, predict: Callable[..., np.ndarray], reference: STVFM, precision: Precision,
                 max_batch: int) -> dict[str, Any]:
    """``predict(x, tod, dow)`` (an opened session's: check, then run) against ``reference`` (fp32, CPU) at the
    batches of :func:`parity_batches`; the measured figures, or :class:`ParityError`."""
    seed = secrets.randbits(31)
    gen = torch.Generator().manual_seed(seed)
    errors = {}
    for batch in parity_batches(max_batch):
        args = example_inputs(reference, batch=batch, generator=gen)
        with torch.inference_mode():
            ref = reference(*args).numpy()
        y = predict(*[a.numpy() for a in args], *[None] * (3 - len(args)))
        errors[str(batch)] = relative_error(y, ref)
    worst = max(errors.values())
    result = {"metric": "||y - y_ref|| / ||y_ref||", "rel_err": errors, "max_rel_err": worst,
              "tolerance": precision.tolerance, "seed": seed, "reference": "fp32 eager on cpu"}
    if not worst <= precision.tolerance:
        raise ParityError(f"{name} ({precision.name}) fails the parity gate: relative error {worst:.3g} > "
                          f"{precision.tolerance:g} (batches {list(errors)}, seed {seed})")
    return result
