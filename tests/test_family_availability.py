"""A registered family whose library does not import in this environment is skipped and says why: the
Qwen2.5-VL family needs a newer transformers than the LLaVA stack's 4.37.2 (it runs in .venv-qwen)."""
from __future__ import annotations

import json

import pytest

from restore import families


def _has_qwen() -> bool:
    import transformers

    return hasattr(transformers, "Qwen2_5_VLForConditionalGeneration")


@pytest.mark.skipif(_has_qwen(), reason="this transformers has Qwen2.5-VL")
def test_qwen_family_is_unavailable_in_the_llava_environment(tmp_path):
    assert "qwen_patches.family" in families.FAMILY_MODULES
    names = [f.name for f in families.families()]
    assert "llava" in names and "qwen2_5_vl" not in names
    reason = families.unavailable_families()["qwen2_5_vl"]
    assert "make install-qwen" in reason and ".venv-qwen" in reason
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(families.CheckpointError, match="qwen2_5_vl checkpoint, which cannot run in this environment"):
        families.family_of_checkpoint(str(tmp_path))
