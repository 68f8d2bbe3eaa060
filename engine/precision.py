"""Build precisions and their parity tolerances: the one dispatch point for ``--precision``.

A precision names the compute dtype of the served graph (inputs and outputs stay float32) and the
parity gate's tolerance against the fp32 reference. Which backend can build which precision is
recorded per backend in :mod:`stvfm_engine.engine.registry`; a new precision is a new entry here plus the
backends that accept it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stvfm_engine.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype  # compute dtype of the served graph
    tolerance: float  # parity gate: max ||y - y_ref|| / ||y_ref|| against the fp32 reference

    @property
    def reduced(self) -> bool:
        return self.dtype != torch.float32


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", torch.float32, 1e-4),
    "bf16": Precision("bf16", torch.bfloat16, 2e-2),
    "fp16": Precision("fp16", torch.float16, 2e-2),
    # int8: weights (and activations) quantised; build --calib-data adds the test-MAE gate
    "int8": Precision("int8", torch.int8, 5e-2),
}


def get_precision(name: str | Precision) -> Precision:
    if isinstance(name, Precision):
        return name
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; expected one of {sorted(PRECISIONS)}")
    return PRECISIONS[name]


def tolerances_text() -> str:
    """The parity tolerances as help texts quote them: ``<= 1e-4 fp32, <= 2e-2 bf16/fp16, <= 5e-2 int8``."""
    by: dict[float, list[str]] = {}
    for p in PRECISIONS.values():
        by.setdefault(p.tolerance, []).append(p.name)
    return ", ".join(f"<= {f'{t:.0e}'.replace('e-0', 'e-')} {'/'.join(n)}" for t, n in by.items())
