"""The model-family seam: the core imports no model code, restore.apply and the entry points find a
model's family, and a family registered from outside is used by restore.apply like the built-in one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import restore
from restore import families

REPO = Path(__file__).resolve().parents[1]


def test_the_core_imports_no_model_code():
    core = "restore.api, restore.settings, restore.merge, restore.attention, restore.reduce, restore.families, tokenreduction"
    code = (f"import sys, {core}; "
            "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'llava', 'llava_patches', 'transformers'}); "
            "print(','.join(loaded))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_llava_models_and_checkpoints_are_found(small_model, small_checkpoint, tmp_path):
    from llava_patches.family import FAMILY

    assert families.family_of_model(small_model.model) is FAMILY
    assert families.family_of_checkpoint(str(small_checkpoint)) is FAMILY
    # what no family recognises is explained by each family
    with pytest.raises(TypeError, match="expects a llava LlavaLlamaForCausalLM"):
        families.family_of_model(torch.nn.Linear(2, 2))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(families.CheckpointError, match="not a LLaVA checkpoint"):
        families.family_of_checkpoint(str(tmp_path))


class _ToyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.layer(x)


class _Doubled:
    def forward(self, x):
        return 2 * super().forward(x)


class _ToyFamily(families.ModelFamily):
    name = "toy"

    def recognizes_config(self, config):
        return config.get("model_type") == "toy"

    def recognizes_model(self, model):
        return isinstance(model, _ToyModel)

    def check_model(self, model):
        return 16

    def patch_targets(self, model):
        yield model.layer, _Doubled

    def new_context(self, settings):
        return SimpleNamespace(settings=settings)


def test_a_registered_family_is_patched_by_restore_apply(monkeypatch):
    toy = _ToyFamily()
    monkeypatch.setattr(families, "_FAMILIES", dict(families._FAMILIES))
    families.register_family(toy)
    with pytest.raises(ValueError, match="registered already"):
        families.register_family(_ToyFamily())
    model = _ToyModel()
    x = torch.randn(3, 4)
    before = model(x)
    restore.apply(model, base="HoloV", n_vis=8, restore=True)
    assert torch.equal(model(x), 2 * before)
    settings = restore.settings_of(model)
    assert restore.is_applied(model) and settings is model.layer._restore_ctx.settings
    assert (settings.base, settings.n_vis, settings.num_patches) == ("HoloV", 8, 16)
    restore.remove(model)
    assert type(model.layer) is torch.nn.Linear and torch.equal(model(x), before)
    assert not restore.is_applied(model) and restore.settings_of(model) is None
