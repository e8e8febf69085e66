"""VisPruner and HoloV on Qwen2.5-VL: the importance signal (attention received in the encoder's last block,
per merge group, raster order: LightCompress's Qwen port of VisPruner; HoloV's port takes its mean over the
queries) against transformers' own attention weights, HoloV's crop count, and the reductions."""
from __future__ import annotations

import pytest
import torch

import tokenreduction as tr
from restore import apply
from qwen_patches.holov import crop_count, qwen_holov
from qwen_patches.vision import encode_with_received_attention
from tests_qwen.conftest import alone



@torch.no_grad()
def test_signal_equals_transformers_attention_weights(qwen_loaded, model, batch, monkeypatch):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    inner = model.model
    stock_images = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    images, received = encode_with_received_attention(inner, batch["pixel_values"], batch["image_grid_thw"])
    for ours, stock in zip(images, stock_images):
        assert torch.equal(ours, stock)  # the capture leaves the encoder's outputs as they are

    # transformers' eager vision attention returns the softmax weights of each segment; record the last block's
    weights = []
    last = inner.visual.blocks[-1].attn
    original = qwen.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, w = original(module, *args, **kwargs)
        if module is last:
            weights.append(w[0])  # [heads, n, n]
        return out, w

    monkeypatch.setattr(qwen, "eager_attention_forward", recording)
    monkeypatch.setattr(inner.visual.config, "_attn_implementation", "eager")
    inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    per_patch = torch.cat([w.mean(dim=0).sum(dim=0) for w in weights])
    per_group = per_patch.view(-1, 4).mean(dim=-1)
    window_index, _ = inner.visual.get_window_index(batch["image_grid_thw"])
    expect = per_group[torch.argsort(window_index)]
    torch.testing.assert_close(torch.cat(received), expect, atol=1e-5, rtol=1e-5)
    for r, image in zip(received, images):
        # every patch's attention row sums to 1: an image's groups receive N_k in all
        assert r.sum().item() == pytest.approx(image.shape[0], rel=1e-5)
    for r in received:  # peaked enough to rank: the gaps are far above float rounding
        assert float(r.max() / r.mean()) > 1.5


def reduced_images(qwen_loaded, model, images, batch, base, with_restore):
    """Apply ``base`` at 33.3 % (8 and 7 tokens), check that the batch's answers are each image's alone,
    and give per image what the prefill did: (features, received attention, tokens the base kept, the
    sequence slots of the tokens that stand alone)."""
    apply(model, base, keep=0.333, restore=with_restore)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    last = model.model._restore_ctx.last
    n = [8, 7]
    for b in range(2):
        single = alone(qwen_loaded, images, b)
        ref = model.generate(**single, max_new_tokens=5, do_sample=False)
        assert out[b, batch["input_ids"].shape[1]:].tolist() == ref[0, single["input_ids"].shape[1]:].tolist()
    for b in range(2):
        source, sizes, received = last["kept"][b], last["sizes"][b], last["received"][b]
        features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])[b]
        singletons = {int((source == slot).nonzero()[0]) for slot in range(n[b]) if int(sizes[slot]) == 1}
        yield features, received, n[b] // 2 if with_restore else n[b], singletons


@torch.no_grad()
@pytest.mark.parametrize("with_restore", [False, True])
def test_vispruner_reduction(qwen_loaded, model, images, batch, with_restore):
    for features, received, n_keep, singletons in reduced_images(qwen_loaded, model, images, batch, "VisPruner",
                                                                 with_restore):
        picks = tr.get_selector("VisPruner")(tr.VisualTokens(features=features[None], raw_features=features[None],
                                                             cls_attention=received[None]), n_keep)[0]
        assert set(picks.tolist()) <= singletons
        # the most attended tokens are among the picks
        top = received.argsort(descending=True)[: n_keep // 2].tolist()
        assert set(top) <= set(picks.tolist())


def test_holov_crop_count_and_the_registry_holov_at_16_crops():
    assert crop_count(576, 64) == 16  # LLaVA-1.5's layout: the registry's 16 crops
    assert [crop_count(1000, n) for n in (333, 222, 111)] == [5, 8, 16]  # the paper's three shares
    assert crop_count(24, 8) == 5 and crop_count(20, 100) == 1
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 576, 32, generator=generator)
    attention = torch.rand(2, 576, generator=generator).softmax(dim=-1)
    tokens = tr.VisualTokens(features=features, cls_attention=attention)
    assert torch.equal(qwen_holov(tokens, 64), tr.get_selector("HoloV")(tokens, 64))
    picks = qwen_holov(tokens, 192)  # 5 crops
    assert picks.shape == (2, 192) and all(len(set(row.tolist())) == 192 for row in picks)


@torch.no_grad()
@pytest.mark.parametrize("with_restore", [False, True])
def test_holov_reduction(qwen_loaded, model, images, batch, with_restore):
    for features, received, n_keep, singletons in reduced_images(qwen_loaded, model, images, batch, "HoloV",
                                                                 with_restore):
        mean = received / (4 * features.shape[0])
        picks = qwen_holov(tr.VisualTokens(features=features[None], cls_attention=mean[None]), n_keep)[0]
        assert set(picks.tolist()) <= singletons and len(picks) == n_keep
