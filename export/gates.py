"""The task gate every reduced-precision artifact must pass when the build is given data.

The parity gate (:mod:`stvfm_engine.export.parity`) compares every artifact with the fp32 reference
on random inputs at the precision's tolerance. With ``--calib-data PREFIX`` (a data prefix,
``PREFIX_{train,val,test}.npz``) a reduced-precision artifact must also keep the forecasting task's
accuracy: its test MAE within ``max_mae_loss`` (default 1%) of the fp32 reference's on the same windows.
"""
from __future__ import annotations

import os

from stvfm_engine.errors import ConfigError, PrecisionGateError
from stvfm_engine.export.parity import relative_error
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.model.data import load_flow_data, windows_for
from stvfm_engine.model.evaluate import ErrorAccumulator, Forecaster

DEFAULT_MAX_MAE_LOSS = 0.01


def check_max_mae_loss(max_mae_loss: float) -> float:
    if not (isinstance(max_mae_loss, (int, float)) and 0 <= max_mae_loss < float("inf")):
        raise ConfigError(f"max_mae_loss must be a finite number >= 0, got {max_mae_loss!r}")
    return float(max_mae_loss)


def mae_gate(predict: Forecaster, reference: Forecaster, calib_data: str | os.PathLike, config: STVFMConfig,
             precision: str, max_mae_loss: float = DEFAULT_MAX_MAE_LOSS, split: str = "test",
             batch_size: int = 64) -> dict:
    """Test MAE of ``predict`` vs ``reference`` (fp32) on the same windows of ``split``.

    ``mae_loss = (mae - mae_fp32) / mae_fp32`` must be <= ``max_mae_loss`` (a gain always passes);
    returns the figures for the manifest, or raises :class:`PrecisionGateError`.
    """
    max_mae_loss = check_max_mae_loss(max_mae_loss)
    windows = windows_for(config, load_flow_data(calib_data), split)
    acc_ref, acc = ErrorAccumulator(), ErrorAccumulator()
    worst_rel = 0.0
    for x, y, tod, dow in windows.batches(batch_size):
        y_ref, y_low = reference(x, tod, dow), predict(x, tod, dow)
        acc_ref.add(y_ref, y)
        acc.add(y_low, y)
        worst_rel = max(worst_rel, relative_error(y_low, y_ref))
    mae_ref, mae = acc_ref.result()["mae"], acc.result()["mae"]
    loss = (mae - mae_ref) / max(mae_ref, 1e-12)
    result = {"gate": "test_mae", "precision": precision, "data": str(calib_data), "split": split,
              "windows": len(windows), "mae_fp32": mae_ref, "mae": mae, "mae_loss": loss,
              "max_mae_loss": max_mae_loss, "max_rel_err_vs_fp32": worst_rel, "passed": loss <= max_mae_loss}
    if not result["passed"]:
        raise PrecisionGateError(f"{precision} artifact fails the task gate: {split} MAE {mae:.4f} vs fp32 {mae_ref:.4f} "
                                 f"(+{100 * loss:.2f}% > {100 * max_mae_loss:g}% allowed; --max-mae-loss changes it)")
    return result
