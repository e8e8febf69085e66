"""Methods acting inside the LLM (FastV, PDrop, SparseVLM) on the small LLaVA-1.5 checkpoint.

The reference here is a hand-written layer loop over the stock decoder layers: at each score layer the
attention comes from transformers' own eager attention (``output_attentions=True``), the cut is restated
from the official algorithms (FastV: top-R of the last token's row, original positions; PDrop: the same
with contiguous positions; SparseVLM: raters and recycling from tokenreduction.sparsevlm, whose pieces
tests/test_sparsevlm.py checks against the official code), and generated tokens are appended to every
layer's sequence with their positions continuing. The mechanism under test instead computes the rows
from the layers' projections, keeps SDPA and a per-layer KV cache.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX

import restore
import tokenreduction as tr
from restore.inllm import ImageTrack, StageLayout, apply_choice, rebuild_sequence, stage_choice, start_track
from restore.settings import resolve_settings
from tokenreduction.inllm import StageChoice, StageView
from tokenreduction.sparsevlm import recycle_choice, select_raters, supported_budget, tokens_after_cut
from tests.test_restore import _pad_batch, generate

N = 576
def run_of(model):
    return model.get_model()._restore_ctx.run


def kept_patches(track: ImageTrack) -> List[int]:
    return (track.source >= 0).nonzero().flatten().tolist()


# ---- the restatement ----------------------------------------------------------------------------------

def _causal(L: int, dtype) -> torch.Tensor:
    mask = torch.full((L, L), torch.finfo(dtype).min).triu(1)
    return mask[None, None].to(dtype)


def reference_forward(model, ids, images, base: str, n_vis: int, generated: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, List[List[int]]]:
    """(logits [L', V] of the last prompt token and every appended token, the original patches alive after
    each stage), by the official algorithms on stock layers. One sample, no padding."""
    restore.remove(model)
    llm = model.get_model()
    for layer in llm.layers:  # retained ids run past the sequence length: every layer gets the whole table
        rotary = layer.self_attn.rotary_emb
        rotary.forward = (lambda original: lambda x, seq_len=None: original(x, seq_len=rotary.max_seq_len_cached))(
            type(rotary).forward.__get__(rotary))
    try:
        return _reference_forward(model, llm, ids, images, base, n_vis, generated)
    finally:
        for layer in llm.layers:
            del layer.self_attn.rotary_emb.forward


def _reference_forward(model, llm, ids, images, base, n_vis, generated):
    with torch.inference_mode():
        embeds = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images)[4][0]
        prompt_len = embeds.shape[0]
        if generated is not None:
            embeds = torch.cat([embeds, llm.embed_tokens(generated)])
        start = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])
        method = tr.llm_method(base)
        stages = method.stages(n_vis, N, len(llm.layers))
        retained = method.plain_positions == "retained"
        h = embeds.unsqueeze(0)
        positions = torch.arange(h.shape[1])
        visual = torch.arange(start, start + N)  # sequence index of each visual token
        patches = list(torch.arange(N).unsqueeze(1))  # original patches of each visual token (sets)
        last = prompt_len - 1  # the last prompt token's index
        alive_per_stage: List[List[int]] = []
        scores_at: Dict[int, torch.Tensor] = {}
        for i, layer in enumerate(llm.layers):
            mask = _causal(h.shape[1], h.dtype)
            pos = positions.unsqueeze(0)
            for s, stage in enumerate(stages):
                if stage.layer != i:
                    continue
                if stage.score_layer == i:
                    scores_at[s] = _reference_attention(layer, h, positions)
                attention = scores_at.pop(s)
                if base == "SparseVLM":
                    rows = attention[int(visual[-1]) + 1:last + 1]  # every prompt token after the image
                    raters = select_raters(embeds[:prompt_len], torch.arange(start, start + N))
                    scores = rows[raters][:, visual].mean(dim=0)
                    kept, merged = tokens_after_cut(supported_budget(n_vis)[s], visual.shape[0])
                    choice = recycle_choice(scores, h[0, visual], kept, merged)
                    keep = choice.keep
                    members = [torch.cat([patches[int(m)] for m in choice.merged_members[choice.group_of == g]])
                               for g in range(choice.n_groups)]
                    new_visual_h = torch.cat([h[0, visual[keep]], choice.merged_features.to(h.dtype)])
                    patches = [patches[int(k)] for k in keep] + members
                else:
                    keep = attention[last, visual].topk(stage.budget).indices.sort().values
                    new_visual_h = h[0, visual[keep]]
                    patches = [patches[int(k)] for k in keep]
                n_new = new_visual_h.shape[0]
                first = int(visual[0])
                h = torch.cat([h[:, :first], new_visual_h.unsqueeze(0), h[:, int(visual[-1]) + 1:]], dim=1)
                removed = visual.shape[0] - n_new
                if retained:  # FastV: kept tokens and the text keep their position ids
                    positions = torch.cat([positions[:first], positions[visual[keep]], positions[int(visual[-1]) + 1:]])
                else:
                    positions = torch.arange(h.shape[1])
                visual = torch.arange(first, first + n_new)
                last -= removed
                alive_per_stage.append(sorted(int(p) for group in patches for p in group.flatten()))
                mask, pos = _causal(h.shape[1], h.dtype), positions.unsqueeze(0)
            for s, stage in enumerate(stages):
                if stage.score_layer == i < stage.layer:  # on this layer's input, after its cuts
                    scores_at[s] = _reference_attention(layer, h, positions)
            h = layer(h, attention_mask=mask, position_ids=pos)[0]
        logits = model.lm_head(llm.norm(h))[0]
    return logits[last:], alive_per_stage


def _reference_attention(layer, h, positions) -> torch.Tensor:
    """[L, L] the layer's eager attention weights on its input ``h``, mean over heads."""
    mask = _causal(h.shape[1], h.dtype)
    weights = layer.self_attn(layer.input_layernorm(h), attention_mask=mask, position_ids=positions.unsqueeze(0),
                              output_attentions=True)[1]
    return weights.mean(dim=1)[0].float()


CASES = [("FastV", 64), ("FastV", 192), ("PDrop", 64), ("PDrop", 128), ("SparseVLM", 64), ("SparseVLM", 192)]


@pytest.mark.parametrize("base,n_vis", CASES)
def test_plain_rows_equal_the_restated_official_algorithms(model, prompts, base, n_vis):
    ids, img = prompts[0]
    ref_logits, ref_alive = reference_forward(model, ids, img, base, n_vis)
    restore.apply(model, base=base, n_vis=n_vis)
    with torch.inference_mode():
        logits = model(input_ids=ids, images=img).logits[0]
    run = run_of(model)
    assert [kept_patches(r.tracks[0]) for r in run.records] == ref_alive  # exact tokens at every stage
    assert [r.stage.budget for r in run.records] == [len(r.tracks[0].sizes) for r in run.records]
    torch.testing.assert_close(logits[-1], ref_logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base,n_vis", [("FastV", 64), ("PDrop", 64), ("SparseVLM", 128)])
def test_cached_decoding_equals_recomputation_without_cache(model, prompts, base, n_vis):
    ids, img = prompts[1]
    restore.apply(model, base=base, n_vis=n_vis)
    tokens, scores = generate(model, ids, img, n=4)
    generated = tokens[0, -4:]
    ref_logits, _ = reference_forward(model, ids, img, base, n_vis, generated=generated[:-1])
    assert ref_logits.argmax(dim=-1).tolist() == generated.tolist()
    torch.testing.assert_close(scores[0], ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("base,n_vis", [("FastV", 64), ("PDrop", 128), ("SparseVLM", 64)])
def test_restore_invariants_at_every_stage(model, prompts, base, n_vis):
    ids, img = prompts[0]
    restore.apply(model, base=base, n_vis=n_vis, restore=True)
    with torch.inference_mode():
        logits = model(input_ids=ids, images=img).logits
    assert torch.isfinite(logits).all()
    run = run_of(model)
    assert len(run.records) == len(run.stages) and len(run.layouts) == len(run.stages) + 1
    for record, layout in zip(run.records, run.layouts[1:]):
        (track,) = record.tracks
        assert track.num_tokens == record.stage.budget
        assert float(track.sizes.sum()) == N  # RESTORE merges every token it does not keep: nothing is lost
        counts = torch.bincount(track.source, minlength=track.num_tokens)
        torch.testing.assert_close(counts.float(), track.sizes)
        assert (track.positions.diff() > 0).all()  # retained positions, increasing along the sequence
        assert (layout.positions[0].diff() > 0).all()
        visual = layout.is_visual[0]
        assert layout.positions[0, visual].tolist() == track.positions.tolist()
        assert layout.sizes[0, visual].tolist() == track.sizes.tolist()
        # text after the image keeps its position in the full sequence
        assert int(layout.positions[0, -1]) == int(run.layouts[0].positions[0, -1])


@pytest.mark.parametrize("base", ["FastV", "PDrop"])
def test_full_budget_equals_stock(model, prompts, base):
    ids, img = prompts[0]
    with torch.inference_mode():
        stock = model(input_ids=ids, images=img).logits
        stock_tokens, stock_scores = generate(model, ids, img, n=4)
    restore.apply(model, base=base, n_vis=N)
    with torch.inference_mode():
        logits = model(input_ids=ids, images=img).logits
    tokens, scores = generate(model, ids, img, n=4)
    assert logits.shape == stock.shape
    torch.testing.assert_close(logits, stock, rtol=1e-5, atol=1e-5)
    assert tokens.tolist() == stock_tokens.tolist()
    torch.testing.assert_close(scores, stock_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base,use_restore", [("FastV", True), ("PDrop", False), ("SparseVLM", True)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_generate_equals_per_sample(model, prompts, base, use_restore, side):
    restore.apply(model, base=base, n_vis=64, restore=use_restore)
    alone = [generate(model, ids, img, n=4) for ids, img in prompts]
    ids, mask, images = _pad_batch(prompts, side)
    tokens, scores = generate(model, ids, images, n=4, attention_mask=mask)
    for b, (one_tokens, one_scores) in enumerate(alone):
        assert tokens[b, -4:].tolist() == one_tokens[0, -4:].tolist()
        torch.testing.assert_close(scores[b], one_scores[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_forward_equals_per_sample(model, prompts, side):
    restore.apply(model, base="PDrop", n_vis=64, restore=True)
    alone = []
    for ids, img in prompts:
        with torch.inference_mode():
            alone.append(model(input_ids=ids, images=img).logits[0])
        alone[-1] = (alone[-1], [kept_patches(r.tracks[0]) for r in run_of(model).records])
    ids, mask, images = _pad_batch(prompts, "right")
    old_side = model.config.tokenizer_padding_side
    model.config.tokenizer_padding_side = side
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids, images=images, attention_mask=mask).logits
    finally:
        model.config.tokenizer_padding_side = old_side
    run = run_of(model)
    for b, (one, kept) in enumerate(alone):
        real = logits[b, -one.shape[0]:] if side == "left" else logits[b, :one.shape[0]]
        torch.testing.assert_close(real, one, rtol=1e-4, atol=1e-4)
        assert [kept_patches(r.tracks[b]) for r in run.records] == kept


def test_beams_and_sampling_run_on_the_reduced_cache(model, prompts):
    ids, img = prompts[0]
    restore.apply(model, base="PDrop", n_vis=64, restore=True)
    with torch.inference_mode():
        beams = model.generate(ids, images=img, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
                               pad_token_id=0)
        torch.manual_seed(0)
        first = model.generate(ids, images=img, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
        torch.manual_seed(0)
        second = model.generate(ids, images=img, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    assert beams.shape[0] == 2 and first.tolist() == second.tolist()


def test_eager_equals_sdpa(small_checkpoint, model, prompts):
    from llava_patches.loading import load_model

    eager = load_model(small_checkpoint, device="cpu", dtype="float32", attn_implementation="eager")[1]
    ids, img = prompts[1]
    for m in (eager, model):
        restore.apply(m, base="SparseVLM", n_vis=128, restore=True)
    a, sa = generate(eager, ids, img, n=3)
    b, sb = generate(model, ids, img, n=3)
    assert torch.equal(a, b)
    torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-4)
    assert [kept_patches(r.tracks[0]) for r in run_of(eager).records] == \
        [kept_patches(r.tracks[0]) for r in run_of(model).records]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs(fresh_small_model, prompts, dtype):
    model = fresh_small_model.model.to(dtype)
    ids, img = prompts[0]
    restore.apply(model, base="SparseVLM", n_vis=64, restore=True)
    tokens, scores = generate(model, ids, img.to(dtype), n=3)
    assert torch.isfinite(scores).all() and tokens.shape[1] >= 3


def test_labels_are_refused(model, prompts):
    ids, img = prompts[0]
    restore.apply(model, base="FastV", n_vis=64)
    with pytest.raises(ValueError, match="FastV cuts tokens inside the LLM"):
        model(input_ids=ids, images=img, labels=ids)


def test_a_budget_without_a_schedule_is_refused_before_the_model_runs(model):
    with pytest.raises(ValueError, match="SparseVLM has official settings only for n_vis in"):
        restore.apply(model, base="SparseVLM", n_vis=100)
    assert not restore.is_applied(model)


# ---- one cut by hand ----------------------------------------------------------------------------------

def test_two_stage_example_by_hand():
    """Six patches at positions 10..15. Cut 1 keeps patches 0 and 3 and merges {1, 2} and {4, 5}; cut 2
    keeps the {1, 2} group and merges patch 0 with the {4, 5} group."""
    hidden = torch.arange(6.0).unsqueeze(1).repeat(1, 2)  # token i has features (i, i)
    track = start_track(0, torch.arange(10, 16))
    first = StageChoice(keep=torch.tensor([0, 3]), merged_members=torch.tensor([1, 2, 4, 5]),
                        group_of=torch.tensor([0, 0, 1, 1]), n_groups=2)
    tokens, track = apply_choice(track, first, hidden)
    # by position: patch 0 (10), group {1,2} (median 11), patch 3 (13), group {4,5} (14)
    assert track.positions.tolist() == [10, 11, 13, 14]
    assert track.sizes.tolist() == [1, 2, 1, 2]
    assert tokens[:, 0].tolist() == [0, 1.5, 3, 4.5]
    assert track.source.tolist() == [0, 1, 1, 2, 3, 3]
    second = StageChoice(keep=torch.tensor([1]), merged_members=torch.tensor([0, 2, 3]),
                         group_of=torch.tensor([0, 0, 0]), n_groups=1)
    tokens, track = apply_choice(track, second, tokens)
    # the merged group stands for patches 0, 3, 4, 5 (sizes 1 + 1 + 2): size-weighted mean (0 + 3 + 9) / 4,
    # lower median of positions 10, 13, 14, 15 -> 13; the kept group keeps 11
    assert track.positions.tolist() == [11, 13]
    assert track.sizes.tolist() == [2, 4]
    assert tokens[:, 0].tolist() == [1.5, 3.0]
    assert track.source.tolist() == [1, 0, 0, 1, 1, 1]


def test_one_cut_of_the_sequence_by_hand():
    """Two samples, left padded: text t0, 3 visual tokens, text t1; each keeps its best token and merges
    the other two (RESTORE, gamma 0.5 of a budget of 2)."""
    D = 4
    hidden = torch.randn(2, 6, D)
    valid = torch.tensor([[True] * 5 + [True], [False] + [True] * 5])
    is_visual = torch.tensor([[False, True, True, True, False, False], [False, False, True, True, True, False]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 4]])
    layout = StageLayout(positions, torch.ones(2, 6), is_visual, valid, torch.tensor([6, 5]), "left")
    tracks = [start_track(0, torch.tensor([1, 2, 3])), start_track(1, torch.tensor([1, 2, 3]))]
    spans = [torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])]
    settings = resolve_settings("FastV", 2, True, 3)

    class Best(tr.InLLMMethod):
        name = "best"

        def scores(self, view):
            return view.visual_attention[-1]

    new_tokens, new_tracks = [], []
    for b, (track, span) in enumerate(zip(tracks, spans)):
        attention = torch.zeros(1, int(valid[b].sum()))
        offset = int((~valid[b]).sum())
        attention[0, span[b % 2] - offset] = 1.0  # sample 0 favours its first token, sample 1 its second
        view = StageView(attention=attention, query_index=torch.tensor([attention.shape[1] - 1]),
                         visual_index=span - offset, hidden=hidden[b, offset:], sizes=track.sizes, stage=0, budget=2)
        choice = stage_choice(Best(), view, settings)
        assert choice.keep.tolist() == [b % 2] and choice.n_groups == 1
        t, nt = apply_choice(track, choice, hidden[b, span])
        new_tokens.append(t)
        new_tracks.append(nt)
    out, new_layout, new_spans = rebuild_sequence(hidden, layout, spans, new_tokens, new_tracks, reindex=False)
    assert out.shape == (2, 5, D)
    # sample 0: t0, kept (pos 1), merged {2, 3} (pos 2), text at 4, 5
    assert new_layout.positions[0].tolist() == [0, 1, 2, 4, 5]
    assert new_layout.sizes[0].tolist() == [1, 1, 2, 1, 1]
    torch.testing.assert_close(out[0, 2], (hidden[0, 2] + hidden[0, 3]) / 2)
    # sample 1 (one text token fewer, left padded): pad, t0, merged {1, 3} (median 1), kept 2, text
    assert new_layout.valid[1].tolist() == [False, True, True, True, True]
    assert new_layout.positions[1, 1:].tolist() == [0, 1, 2, 4]
    assert new_layout.sizes[1, 1:].tolist() == [1, 2, 1, 1]
    torch.testing.assert_close(out[1, 2], (hidden[1, 2] + hidden[1, 4]) / 2)
    assert [s.tolist() for s in new_spans] == [[1, 2], [2, 3]]
