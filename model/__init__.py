"""The reference ST-VFM model: config and presets, model, checkpoint I/O, data, training, evaluation."""
from stvfm_engine.model.config import PRESETS, STVFMConfig, from_preset
from stvfm_engine.model.stvfm import STVFM, build_model

__all__ = ["PRESETS", "STVFMConfig", "from_preset", "STVFM", "build_model"]
