"""The reduced path's RoPE and attention-mask decisions, as the official RESTORE model makes them (issue 8, 13-14).

On a GPU these choose the values and kernels; here the same decisions are checked on the CPU: which
table cos/sin come from and where it is computed, and which mask object reaches SDPA.
"""
import pytest
import torch

import restore
from llava_patches.patch import boolean_causal_mask, official_rope_tables
from tests.test_loading import _RecordCos


@pytest.fixture
def prompt(small_model, make_inputs, synthetic_image):
    tokenizer, model, processor = small_model
    image = synthetic_image(3)
    return make_inputs(tokenizer, processor, "What is in the image?", image, model_config=model.config)


@pytest.mark.parametrize("use_restore", [False, True])
def test_reduced_rope_is_recomputed_per_call_in_float32(model, use_restore):
    """Official: cos/sin from the frequencies at every call, in float32 on their device, cast at the end;
    never the stored table (on a GPU its CPU-computed values differ in the last bit)."""
    restore.apply(model, base="DivPrune", n_vis=64, restore=use_restore)
    rope = model.get_model().layers[1].self_attn.rotary_emb
    stored = rope.cos_cached.clone(), rope.sin_cached.clone()
    x = torch.zeros(1, 2, 5, rope.dim, dtype=torch.float16)
    try:
        rope.cos_cached.fill_(float("nan"))
        rope.sin_cached.fill_(float("nan"))
        recorder = _RecordCos()
        with recorder:
            cos, sin = rope(x, seq_len=40)
    finally:
        rope.cos_cached.copy_(stored[0])
        rope.sin_cached.copy_(stored[1])
    assert set(recorder.calls) == {(rope.inv_freq.device.type, torch.float32)}
    angles = torch.outer(torch.arange(40, dtype=torch.float32), rope.inv_freq.float())
    angles = torch.cat([angles, angles], dim=-1)
    assert cos.dtype == sin.dtype == torch.float16
    assert torch.equal(cos, angles.cos().half()) and torch.equal(sin, angles.sin().half())


def test_official_rope_tables_run_on_the_frequencies_device():
    inv_freq = torch.ones(4, device="meta")
    recorder = _RecordCos()
    with recorder:
        cos, _ = official_rope_tables(inv_freq.half(), 7, torch.empty(1, device="meta", dtype=torch.bfloat16))
    assert set(recorder.calls) == {("meta", torch.float32)}
    assert cos.shape == (7, 8) and cos.dtype == torch.bfloat16


def _record_sdpa(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((query.shape[-2], key.shape[-2], attn_mask, is_causal))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def _generate(model, ids, images, steps=3):
    with torch.inference_mode():
        return model.generate(ids, images=images, max_new_tokens=steps, do_sample=False, num_beams=1,
                              use_cache=True, pad_token_id=0, min_new_tokens=steps)


def test_base_only_sdpa_gets_the_official_boolean_causal_mask(model, prompt, monkeypatch):
    ids, images = prompt
    restore.apply(model, base="VisPruner", n_vis=64)
    calls = _record_sdpa(monkeypatch)
    _generate(model, ids, images)
    layers = len(model.get_model().layers)
    assert len(calls) == 3 * layers
    for q_len, k_len, mask, is_causal in calls:
        official = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len).view(1, 1, q_len, k_len)
        assert not is_causal and mask is not None and mask.dtype == torch.bool
        assert torch.equal(mask, official)
    assert calls[0][0] == ids.shape[1] - 1 + 64  # the prefill, reduced


def test_restore_masks_still_additive(model, prompt, monkeypatch):
    ids, images = prompt
    restore.apply(model, base="VisPruner", n_vis=64, restore=True)
    calls = _record_sdpa(monkeypatch)
    _generate(model, ids, images, steps=2)
    assert calls and all(mask is not None and mask.dtype == torch.float32 for _, _, mask, _ in calls)


def test_stock_model_keeps_transformers_choice(model, prompt, monkeypatch):
    ids, images = prompt
    calls = _record_sdpa(monkeypatch)
    _generate(model, ids, images, steps=1)
    assert calls[0][2] is None and calls[0][3]  # stock: is_causal, no mask


def test_boolean_causal_mask_with_padding():
    valid = torch.tensor([[False, True, True, True]])
    mask = boolean_causal_mask(valid, q_len=4)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)  # a padding query keeps its own key: no empty row
    assert torch.equal(boolean_causal_mask(valid, q_len=1)[0, 0], valid)
