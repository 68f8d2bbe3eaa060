"""Every preset builds: the whole model on the meta device (no memory, no weights), its output shape
and its parameter counts, so that no preset can break unnoticed (timm's registry habit)."""
from __future__ import annotations

import pytest
import timm
import torch

from stvfm_engine.model.config import PRESETS
from stvfm_engine.model.stvfm import build_model

# preset -> (all parameters, backbone parameters (frozen), trained parameters), recorded at the
# architecture change; a deliberate change of the model updates this table.
PARAMETERS = {
    "tiny": (2_798_536, 1_817_856, 980_680),
    "bike": (24_646_018, 21_370_368, 3_275_650),
    "city": (97_096_496, 85_209_600, 11_886_896),
    "large": (324_676_480, 303_764_480, 20_912_000),
}


def test_the_table_covers_every_preset():
    assert sorted(PARAMETERS) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_on_meta(name):
    c = PRESETS[name]
    with torch.device("meta"):
        model = build_model(c)
        B = 3
        y = model(torch.empty(B, c.history, c.channels, c.height, c.width),
                  torch.zeros(B, c.history, dtype=torch.long), torch.zeros(B, c.history, dtype=torch.long))
        vit = timm.create_model(c.backbone, pretrained=False)
    assert tuple(y.shape) == (B, c.horizon, c.channels, c.height, c.width)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.backbone.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, frozen, trained) == PARAMETERS[name]
    assert total == frozen + trained and not any(p.requires_grad for p in model.backbone.parameters())
    # the frozen blocks are timm's own: L blocks of the named ViT, parameter for parameter
    layers = c.backbone_layers or len(vit.blocks)
    block = sum(p.numel() for p in vit.blocks[0].parameters())
    assert sum(p.numel() for p in model.backbone.blocks.parameters()) == layers * block
