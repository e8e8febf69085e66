"""DivPrune (+ RESTORE) on Qwen2.5-VL: the budget per image, M-RoPE ids of kept and merged tokens, the text
after the image, decoding positions, the calibrated masks, batches, and keeping everything = stock."""
from __future__ import annotations

import math

import pytest
import torch

import restore
import tokenreduction as tr
from restore import apply
from qwen_patches.inputs import build_inputs
from tests_qwen.conftest import QUESTIONS, alone
from qwen_patches.patch import budget_for_image, group_axis_medians
from restore.attention import mrope_decay



def test_group_axis_medians_by_hand():
    # five tokens of a 2 x 3 grid (t = 0): ids (h, w); token 4 dropped; tokens 0, 2, 3 merged into slot 1
    t = torch.zeros(5, dtype=torch.long)
    h = torch.tensor([0, 0, 0, 1, 1])
    w = torch.tensor([0, 1, 2, 0, 1])
    source = torch.tensor([1, 0, 1, 1, -1])
    got = group_axis_medians(torch.stack([t, h, w]), source, 2)
    # slot 0: token 1 alone -> (0, 0, 1); slot 1: h of {0, 0, 1} -> 0, w of {0, 2, 0} -> sorted 0, 0, 2 -> 0
    assert got.tolist() == [[0, 0], [0, 0], [1, 0]]
    # an even group takes the lower middle, per axis on its own
    got = group_axis_medians(torch.stack([t[:4], h[:4], w[:4]]), torch.zeros(4, dtype=torch.long), 1)
    assert got.flatten().tolist() == [0, 0, 0]  # h: 0,0,0,1 -> index 1; w: 0,0,1,2 -> index 1 -> 0


def test_budget_per_image():
    share = restore.resolve_settings("DivPrune", None, False, 16384, keep=0.111)
    assert share.n_vis == 16384 and restore.run_tag(share) == "divprune-k0.111"
    assert [budget_for_image(share, n) for n in (24, 20, 576)] == [3, 2, 64]
    count = restore.resolve_settings("DivPrune", 64, False, 16384)
    assert [budget_for_image(count, n) for n in (24, 100)] == [24, 64]
    merging = restore.resolve_settings("DivPrune", None, True, 16384, keep=0.01)
    assert budget_for_image(merging, 24) == 2  # one selected, one merged


@torch.no_grad()
def test_keeping_every_token_is_stock(qwen_loaded, model, batch):
    mask = batch["attention_mask"].bool()
    stock_logits = model(**batch).logits
    stock_tokens = model.generate(**batch, max_new_tokens=6, do_sample=False)
    apply(model, "DivPrune", keep=1.0)
    assert torch.equal(model(**batch).logits[mask], stock_logits[mask])
    assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), stock_tokens)


@torch.no_grad()
@pytest.mark.parametrize("with_restore", [False, True])
def test_reduced_prompt_layout(qwen_loaded, model, batch, with_restore):
    apply(model, "DivPrune", keep=0.333, restore=with_restore)
    logits = model(**batch).logits
    last = model.model._restore_ctx.last
    assert last["n_tokens"] == [24, 20]
    n = [8, 7]  # round(0.333 * N)
    L = batch["input_ids"].shape[1]
    assert logits.shape[1] == L - (24 - 8)  # left-padded to the longest reduced prompt (sample 0)
    full, reduced, mask = last["positions_full"], last["positions_reduced"], last["attention_mask"]
    images = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    image_token = model.config.image_token_id
    for b in range(2):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        p_full = full[:, b][:, batch["attention_mask"][b].bool()]
        p_red = reduced[:, b][:, mask[b].bool()]
        start = int((ids == image_token).nonzero()[0])
        stop = start + last["n_tokens"][b]
        # text before the image and after it keeps its full-sequence ids
        assert torch.equal(p_red[:, :start], p_full[:, :start])
        assert torch.equal(p_red[:, start + n[b]:], p_full[:, stop:])
        visual = p_red[:, start:start + n[b]]
        source, sizes = last["kept"][b], last["sizes"][b]
        assert sizes.sum().item() == (last["n_tokens"][b] if with_restore else n[b])
        grid = p_full[:, start:stop]
        for slot in range(n[b]):
            members = (source == slot).nonzero().flatten()
            assert len(members) == int(sizes[slot])
            for axis in range(3):  # per-axis lower-middle median of the members (a kept token: its own ids)
                values = grid[axis, members].sort().values
                assert visual[axis, slot] == values[(len(values) - 1) // 2]
        # the base selects on the post-merger tokens, as the peers' Qwen ports (DivPrune: LightCompress)
        n_keep = n[b] // 2 if with_restore else n[b]
        picks = tr.get_selector("DivPrune")(tr.VisualTokens(features=images[b].unsqueeze(0)), n_keep)[0]
        kept = [int((source == slot).nonzero()[0]) for slot in range(n[b]) if int(sizes[slot]) == 1 and
                int((source == slot).nonzero()[0]) in picks.tolist()]
        assert sorted(kept) == sorted(picks.tolist())
        # visual tokens are fed in raster order of their (h, w) ids' first member
        firsts = [int((source == slot).nonzero()[0]) for slot in range(n[b])]
        assert firsts == sorted(firsts) or with_restore


@torch.no_grad()
def test_decoding_continues_from_the_full_prompts_positions(qwen_loaded, model, batch):
    seen = []

    def grab(module, args, kwargs):
        seen.append(kwargs["position_ids"][-3:].clone())

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.generate(**batch, max_new_tokens=4, do_sample=False)
        stock = [p[:, :, -1] for p in seen]
        seen.clear()
        apply(model, "DivPrune", keep=0.222, restore=True)
        model.generate(**batch, max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    reduced = [p[:, :, -1] for p in seen]
    # the prompt's last token and every generated one sit where they sit in the unreduced model
    assert len(reduced) == len(stock) == 4
    for got, expect in zip(reduced, stock):
        assert torch.equal(got, expect)
    assert torch.equal(model.model.rope_deltas.flatten() + batch["input_ids"].shape[1], stock[1][0])


@torch.no_grad()
def test_calibrated_masks(qwen_loaded, model, batch):
    apply(model, "DivPrune", keep=0.333, restore=True)
    model(**batch)
    last = model.model._restore_ctx.last
    first, later = last["masks"]
    positions, mask, sizes, visual = last["positions_reduced"], last["attention_mask"], last["sizes_row"], last["visual"]
    text = model.config.get_text_config()
    section = text.rope_scaling["mrope_section"]
    head_dim = text.hidden_size // text.num_attention_heads
    n_tokens, n = [24, 20], [8, 7]
    for b in range(2):
        valid = mask[b].bool().nonzero().flatten().tolist()
        for i in valid[::5] + valid[-1:]:
            for j in valid:
                if j > i:
                    assert later[b, 0, i, j] < -1e30
                    continue
                delta = (positions[:, b, i] - positions[:, b, j]).unsqueeze(0)
                dist = math.log(2.0 - mrope_decay(delta, section, head_dim, text.rope_theta).item())
                assert later[b, 0, i, j].item() == pytest.approx(math.log(sizes[b, j].item()) + dist, abs=1e-5)
                uniform = math.log(n_tokens[b] / n[b]) if visual[b, j] else 0.0
                assert first[b, 0, i, j].item() == pytest.approx(uniform + dist, abs=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("with_restore", [False, True])
def test_batch_equals_each_alone(qwen_loaded, model, images, batch, with_restore):
    apply(model, "DivPrune", keep=0.333, restore=with_restore)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    logits = model(**batch).logits[:, -1]
    for b in range(2):
        single = alone(qwen_loaded, images, b)
        ref = model.generate(**single, max_new_tokens=6, do_sample=False)
        assert out[b, batch["input_ids"].shape[1]:].tolist() == ref[0, single["input_ids"].shape[1]:].tolist()
        torch.testing.assert_close(logits[b], model(**single).logits[0, -1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_settings_change_the_answer_and_remove_gives_stock(qwen_loaded, model, batch):
    stock = model.generate(**batch, max_new_tokens=6, do_sample=False)
    answers = set()
    for keep, with_restore in ((0.333, False), (0.333, True), (0.111, True)):
        apply(model, "DivPrune", keep=keep, restore=with_restore)
        answers.add(tuple(model.generate(**batch, max_new_tokens=6, do_sample=False)[0].tolist()))
    assert len(answers) > 1
    restore.remove(model)
    assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), stock)


def test_count_budget_and_refusals(qwen_loaded, model, batch):
    restore.apply(model, base="DivPrune", n_vis=10, restore=True)
    with torch.no_grad():
        model(**batch)
    assert [int(s.numel()) for s in model.model._restore_ctx.last["sizes"]] == [10, 10]
    with pytest.raises(ValueError, match="VisionZip on Qwen2.5-VL is not implemented yet"):
        restore.apply(model, base="VisionZip", n_vis=10)
    with pytest.raises(ValueError, match="keep must be a share"):
        apply(model, "DivPrune", keep=1.5)
    with pytest.raises(ValueError, match="not both"):
        apply(model, "DivPrune", keep=0.5, n_vis=4)
    with pytest.raises(ValueError, match="merged_position"):
        restore.apply(model, base="DivPrune", n_vis=10, restore=True, merged_position="mean")


@torch.no_grad()
def test_half_precision_runs(qwen_checkpoint, images):
    from qwen_patches.family import FAMILY

    tokenizer, model, image_processor, _ = FAMILY.load(str(qwen_checkpoint), device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16
    batch = build_inputs(tokenizer, image_processor, model.config, QUESTIONS, images)
    apply(model, "HoloV", keep=0.222, restore=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    first, later = model.model._restore_ctx.last["masks"]
    assert first.dtype == later.dtype == torch.bfloat16
