"""FlowCut inside LLaVA's CLIP encoder, plain and with RESTORE at every pruning stage.

The plain row is checked against ``reference_flowcut``, a slow restatement of the official LLaVA-1.5 code
(github TungChintao/FlowCut, flowcut/modeling_clip_flowcut.py and utils_flowcut.py) written layer by layer
and head by head, sharing no code with tokenreduction.flowcut: the patches kept at every stage must be the
same. Set FLOWCUT_OFFICIAL_DIR to a checkout of the official repository to also run its own CLIP code on
the same towers and compare features and kept patches.
"""
from __future__ import annotations

import copy
import importlib
import math
import os
import sys
import types
from typing import List, Tuple

import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX

import restore
import tokenreduction as tr
from llava_patches.encoder_reduce import (FlowCutInEncoder, applied_method, apply_encoder_method, encode_in_encoder,
                                          remove_encoder_method)
from llava_patches.vision import encode_with_cls_attention
from restore.small_checkpoint import synthetic_image
from tests import test_batching
from tokenreduction.flowcut import flowcut_stages, stage_keep_count, stage_prune_count

N_PATCHES = 576


# --------------------------------------------------------------------------------------------------
# The restatement of the official algorithm
# --------------------------------------------------------------------------------------------------


def round_half_even(x: float) -> int:
    return int(round(x))  # Python's round is half to even, as torch.round


def reference_prune_count(attention_rows: List[List[float]], remaining: int, n_vis: int) -> int:
    """The official adaptive_prune_ratio for a batch of CLS->patch rows: entropy of each normalised row
    over log t, r = (t - n_vis) / sqrt(remaining) * (1 - ratio^2), the batch's largest r, rounded."""
    best = None
    for row in attention_rows:
        t = len(row)
        total = sum(row)
        entropy = -sum((a / total) * math.log(a / total) for a in row)
        r = (t - n_vis) / math.sqrt(remaining) * (1 - (entropy / math.log(t)) ** 2)
        best = r if best is None else max(best, r)
    return round_half_even(best)


def reference_flowcut(vision_tower, image: torch.Tensor, n_vis: int):
    """FlowCut in LLaVA's CLIP for one image [3, H, W], every layer written out. Returns the select-layer
    patch features [n_vis, C] and, per pruning stage, (layer index, original patches kept, in order)."""
    clip = vision_tower.vision_tower.vision_model
    layers = clip.encoder.layers
    n_run = vision_tower.select_layer % (len(layers) + 1)
    official_select = n_run - 1  # the official encoder.select_layer (len(layers) - 2 for select layer -2)
    x = clip.pre_layrnorm(clip.embeddings(image[None].to(vision_tower.dtype)))[0]
    patches = list(range(x.shape[0] - 1))
    running = None
    stages = []
    for idx in range(n_run):
        layer = layers[idx]
        attn = layer.self_attn
        heads, t_all = attn.num_heads, x.shape[0]
        h = layer.layer_norm1(x)
        q = (attn.q_proj(h) * attn.scale).view(t_all, heads, -1)
        k = attn.k_proj(h).view(t_all, heads, -1)
        v = attn.v_proj(h).view(t_all, heads, -1)
        outs, cls_rows, semantic_rows = [], [], []
        for hd in range(heads):
            probs = torch.softmax(q[:, hd] @ k[:, hd].T, dim=-1)
            cls_rows.append(probs[0].double())
            outs.append(probs @ v[:, hd])
            semantic_rows.append(torch.softmax((v[0, hd] @ v[:, hd].T).double(), dim=-1))
        x = x + attn.out_proj(torch.cat(outs, dim=-1))
        x = x + layer.mlp(layer.layer_norm2(x))
        t = x.shape[0] - 1
        if t <= n_vis:
            continue
        a = [float(sum(row[j] for row in cls_rows) / heads) for j in range(1, t_all)]
        s = [float(sum(row[j] for row in semantic_rows) / heads) for j in range(1, t_all)]
        v_mean = v.double().mean(dim=1)  # [T, d], mean over heads
        l1 = [float(v_mean[j].abs().sum()) for j in range(1, t_all)]
        score = [(a[j] / sum(a) + s[j] / sum(s)) * l1[j] for j in range(t)]
        running = score if running is None else [0.5 * r + 0.5 * c for r, c in zip(running, score)]
        remaining = official_select - idx - 1
        if remaining < 0 or remaining % 2:
            continue
        if remaining == 0:
            keep_n = n_vis
        else:
            keep_n = max(t - reference_prune_count([a], remaining, n_vis), n_vis)
        chosen = sorted(sorted(range(t), key=lambda j: -running[j])[:keep_n])
        x = x[[0] + [j + 1 for j in chosen]]
        running = [running[j] for j in chosen]
        patches = [patches[j] for j in chosen]
        stages.append((idx, list(patches)))
    return x[1:], stages


class RecordingFlowCut(FlowCutInEncoder):
    """FlowCutInEncoder that records, after every layer that changed the tokens, the layer index, the
    token count before, the original patches of every token in sequence order, the sizes, and the hidden
    states after and before the stage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: List[Tuple[int, int, List[List[int]], torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def start(self, run, hidden_states):
        super().start(run, hidden_states)
        self.log = []

    def after_layer(self, run, index, hidden_states, attention, captured):
        before = hidden_states.shape[1] - 1
        out = super().after_layer(run, index, hidden_states, attention, captured)
        if out.shape[1] - 1 != before:
            assignment = run.assignment[0, 1:] - 1
            members = [sorted((assignment == token).nonzero().flatten().tolist()) for token in range(out.shape[1] - 1)]
            size = torch.ones(out.shape[1] - 1) if run.size is None else run.size[0, 1:].clone()
            self.log.append((index, before, members, size, out.clone(), hidden_states.clone()))
        return out


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def test_stages_of_llava_and_small_towers():
    assert flowcut_stages(23) == {i: 21 - i for i in range(1, 22, 2)}  # layers 1, 3, ..., 21
    assert flowcut_stages(5) == {1: 2, 3: 0}
    assert flowcut_stages(2) == {0: 0}
    assert flowcut_stages(1) == {} and flowcut_stages(0) == {}


@pytest.mark.parametrize("n_vis", [192, 128, 64, 37])
@pytest.mark.parametrize("remaining", [20, 9, 2, 1])
def test_prune_count_matches_restatement(n_vis, remaining):
    g = torch.Generator().manual_seed(n_vis * 31 + remaining)
    for t in (576, 400, n_vis + 3):
        for peak in (0.5, 2.0, 6.0):
            attention = torch.softmax(peak * torch.randn(3, t + 1, generator=g, dtype=torch.float64), dim=-1)[:, 1:]
            rows = attention.tolist()
            assert stage_prune_count(attention, remaining, n_vis) == reference_prune_count(rows, remaining, n_vis)
            for b in range(3):  # alone, each sample gets its own count
                count = stage_prune_count(attention[b:b + 1], remaining, n_vis)
                assert count == reference_prune_count(rows[b:b + 1], remaining, n_vis)
                assert stage_keep_count(attention[b:b + 1], remaining, n_vis) == max(t - count, n_vis)
            assert stage_keep_count(attention, 0, n_vis) == n_vis


def test_registry_and_settings():
    assert tr.acts_in("FlowCut") == "vision_encoder" and tr.restore_per_stage("flowcut")
    assert not tr.restore_per_stage("ToMe") and "FlowCut" in tr.available_methods()
    with pytest.raises(ValueError, match="acts in the vision encoder and has no selector"):
        tr.get_selector("FlowCut")
    plain = restore.resolve_settings("FlowCut", 64, False, 576)
    assert plain.is_plain_base and not plain.merges and plain.in_base_order and restore.run_tag(plain) == "flowcut-64"
    ours = restore.resolve_settings("FlowCut", 64, True, 576)
    assert (ours.prune_ratio, ours.anchors, ours.n_keep) == (0.5, "distinctive", 32) and ours.merges
    assert restore.run_tag(ours) == "flowcut-64-restore"
    assert restore.run_tag(restore.resolve_settings("FlowCut", 128, True, 576, prune_ratio=0.75)) == "flowcut-128-restore-g0.75"
    with pytest.raises(ValueError, match="merges tokens itself"):  # ToMe still refuses gamma
        restore.resolve_settings("ToMe", 64, True, 576, prune_ratio=0.75)


def test_paper_lists_table13_as_runnable():
    from restore.paper import get_table, why_not_runnable

    table = get_table("table13")
    configs = table.configs()
    assert any(c.base == "FlowCut" for c in configs)
    assert all(why_not_runnable(table, c, tr.available_methods()) is None for c in configs)
    assert {c.tag() for c in configs if c.base} == {"flowcut-128", "flowcut-128-restore", "flowcut-128-restore-g0.75",
                                                     "flowcut-128-restore-g0.9", "flowcut-64", "flowcut-64-restore",
                                                     "flowcut-64-restore-g0.75", "flowcut-64-restore-g0.9"}


# --------------------------------------------------------------------------------------------------
# In the CLIP tower
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(small_model):
    processor = small_model.image_processor
    pixels = processor(images=[synthetic_image(s) for s in (1, 2, 3)], return_tensors="pt")["pixel_values"]
    return pixels.float()


@pytest.fixture(scope="module")
def tower(small_model):
    return small_model.model.get_model().get_vision_tower()


def deepen(tower, n_layers: int, seed: int):
    """A copy of the small tower with ``n_layers`` CLIP layers (seeded perturbed copies of its own)."""
    deep = copy.deepcopy(tower)
    layers = deep.vision_tower.vision_model.encoder.layers
    g = torch.Generator().manual_seed(seed)
    for i in range(n_layers - len(layers)):
        layer = copy.deepcopy(layers[i % len(layers)])
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        layers.append(layer)
    deep.vision_tower.config.num_hidden_layers = len(layers)
    return deep


@pytest.fixture(scope="module")
def tower8(tower):
    return deepen(tower, 8, 5)  # 7 layers before the select layer: stages at layers 1, 3, 5


@pytest.fixture(scope="module")
def tower24(tower):
    return deepen(tower, 24, 7)  # LLaVA-1.5's depth: stages at layers 1, 3, ..., 21


def _towers(request, name):
    return request.getfixturevalue(name)


@pytest.mark.parametrize("name,n_vis", [("tower", 64), ("tower", 300), ("tower8", 64), ("tower8", 128),
                                        ("tower8", 301), ("tower24", 192), ("tower24", 128), ("tower24", 64),
                                        ("tower24", 37)])
def test_kept_patches_at_every_stage_match_restatement(request, images, name, n_vis):
    vision = _towers(request, name)
    n_run = vision.select_layer % (len(vision.vision_tower.vision_model.encoder.layers) + 1)
    for b in range(images.shape[0]):
        method = RecordingFlowCut()
        out = encode_in_encoder(vision, images[b:b + 1], method, n_vis)
        features, stages = reference_flowcut(vision, images[b], n_vis)
        mine = [(entry[0], [m[0] for m in entry[2]]) for entry in method.log]
        assert all(len(m) == 1 for entry in method.log for m in entry[2])  # pruned, not merged
        assert mine == stages
        assert stages[-1][0] == n_run - 2 and len(stages[-1][1]) == n_vis  # the last stage is before the select layer
        kept = stages[-1][1]
        assert torch.equal(out.source[0][kept], torch.arange(n_vis)) and int((out.source[0] >= 0).sum()) == n_vis
        assert torch.equal(out.sizes, torch.ones(1, n_vis))
        torch.testing.assert_close(out.features[0], features, rtol=1e-4, atol=1e-5)


def test_full_budget_is_stock(tower8, images):
    out = encode_in_encoder(tower8, images, FlowCutInEncoder(), N_PATCHES)
    stock_features, stock_attention = encode_with_cls_attention(tower8, images)
    assert torch.equal(out.features, tower8(images)) and torch.equal(out.features, stock_features)
    assert torch.equal(out.cls_attention, stock_attention)
    assert torch.equal(out.source, torch.arange(N_PATCHES).expand(3, -1))


@pytest.mark.parametrize("gamma,anchors", [(None, "none"), (0.5, "distinctive"), (0.75, "distinctive"),
                                           (0.9, "distinctive"), (0.0, "distinctive"), (0.5, "uniform")])
def test_batch_equals_per_sample(tower8, images, gamma, anchors):
    method = FlowCutInEncoder() if gamma is None else FlowCutInEncoder(gamma, anchors)
    out = encode_in_encoder(tower8, images, method, 64)
    for b in range(images.shape[0]):
        one = encode_in_encoder(tower8, images[b:b + 1], method, 64)
        for mine, alone in zip(out, one):
            assert torch.equal(mine[b:b + 1], alone)


def _stock_state(vision):
    layers = vision.vision_tower.vision_model.encoder.layers
    return [(type(layer), dict(layer.self_attn.k_proj._forward_hooks), dict(layer.self_attn.v_proj._forward_hooks),
             sorted(vars(layer))) for layer in layers]


def test_apply_then_remove_gives_stock_back(tower8, images):
    before_state = _stock_state(tower8)
    before = tower8(images)
    try:
        apply_encoder_method(tower8, FlowCutInEncoder(), 100)
        assert isinstance(applied_method(tower8), FlowCutInEncoder)
        # LLaVA's own forward of one image (all layers, hidden_states[-2]) now gives FlowCut's tokens
        patched = tower8(images[:1])
        assert patched.shape == (1, 100, tower8.hidden_size)
        torch.testing.assert_close(patched, encode_in_encoder(tower8, images[:1], FlowCutInEncoder(), 100).features)
        assert isinstance(applied_method(tower8), FlowCutInEncoder)  # encode_in_encoder leaves the patch on
    finally:
        remove_encoder_method(tower8)
    assert applied_method(tower8) is None and _stock_state(tower8) == before_state
    assert torch.equal(tower8(images), before)


def test_too_shallow_tower_is_refused(tower):
    shallow = copy.deepcopy(tower)
    shallow.select_layer = -3  # one CLIP layer run before the select output: no stage fits
    with pytest.raises(ValueError, match="FlowCut needs at least 2 CLIP layers"):
        encode_in_encoder(shallow, torch.zeros(1, 3, 336, 336), FlowCutInEncoder(), 64)


# --------------------------------------------------------------------------------------------------
# With RESTORE at every stage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,n_vis", [("tower24", 64), ("tower24", 128), ("tower8", 64), ("tower", 64)])
@pytest.mark.parametrize("gamma", [0.5, 0.75, 0.9, 0.0])
def test_restore_invariants_at_every_stage(request, images, name, n_vis, gamma):
    vision = _towers(request, name)
    n_run = vision.select_layer % (len(vision.vision_tower.vision_model.encoder.layers) + 1)
    method = RecordingFlowCut(gamma, "distinctive")
    out = encode_in_encoder(vision, images[1:2], method, n_vis)
    assert method.log and method.log[-1][0] == n_run - 2
    for index, before, members, size, hidden, previous in method.log:
        k = len(members)
        assert k < before and k >= n_vis
        assert torch.isfinite(hidden).all() and hidden.shape[1] == k + 1
        assert float(size.sum()) == N_PATCHES and (size >= 1).all()
        assert sorted(p for m in members for p in m) == list(range(N_PATCHES))  # nothing dropped
        assert [len(m) for m in members] == size.long().tolist()
        medians = [m[(len(m) - 1) // 2] for m in members]
        assert medians == sorted(medians) and len(set(medians)) == k  # ordered by retained position
        # int(gamma * k) tokens are kept as they were (by score; an anchor left alone may add to them)
        unchanged = sum(bool((row == previous[0, 1:]).all(dim=-1).any()) for row in hidden[0, 1:])
        assert unchanged >= int(gamma * k)
        assert torch.equal(hidden[0, 0], previous[0, 0])  # CLS first, untouched
    assert method.log[-1][2] and len(method.log[-1][2]) == n_vis
    assert out.features.shape == (1, n_vis, vision.hidden_size) and torch.isfinite(out.features).all()
    assert float(out.sizes.sum()) == N_PATCHES and (out.source >= 0).all()
    assert torch.equal(torch.bincount(out.source[0], minlength=n_vis).float(), out.sizes[0])


# --------------------------------------------------------------------------------------------------
# Through restore.apply (the small checkpoint: 2 CLIP layers before the select layer, one stage)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def prompt(small_model, make_inputs, synthetic_image):
    tok, model, proc = small_model
    return make_inputs(tok, proc, "What is in the image?", synthetic_image(2, (480, 320)), model_config=model.config)


def _logits_on(model, ids, visual):
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    embed = model.get_model().embed_tokens
    embeds = torch.cat([embed(ids[0, :at]), visual, embed(ids[0, at + 1:])]).unsqueeze(0)
    restore.remove(model)
    return model(inputs_embeds=embeds).logits


@pytest.mark.parametrize("n_vis", [64, 192])
def test_plain_flowcut_feeds_its_pruned_select_layer(model, prompt, n_vis):
    ids, images = prompt
    with torch.inference_mode():
        pruned = encode_in_encoder(model.get_vision_tower(), images, FlowCutInEncoder(), n_vis)
        expected = _logits_on(model, ids, model.get_model().mm_projector(pruned.features)[0])
        restore.apply(model, base="FlowCut", n_vis=n_vis)
        out = model(input_ids=ids, images=images).logits
        layout = model._restore_ctx.layout
    assert int(layout.is_visual.sum()) == n_vis and torch.equal(layout.positions[0], torch.arange(layout.length))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert model.get_vision_tower().vision_tower.vision_model.encoder.layers[0].__class__.__name__ == "CLIPEncoderLayer"


@pytest.mark.parametrize("gamma", [None, 0.75])
def test_flowcut_with_restore_end_to_end(model, prompt, gamma):
    ids, images = prompt
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    with torch.inference_mode():
        merged = encode_in_encoder(model.get_vision_tower(), images, FlowCutInEncoder(gamma or 0.5, "distinctive"), 64)
        restore.apply(model, base="FlowCut", n_vis=64, restore=True, prune_ratio=gamma)
        settings = restore.settings_of(model)
        model(input_ids=ids, images=images)
        layout = model._restore_ctx.layout
        generated = model.generate(ids, images=images, max_new_tokens=3, do_sample=False)
    assert settings.calibrates and settings.retains_positions and settings.merges
    assert restore.run_tag(settings) == ("flowcut-64-restore" if gamma is None else "flowcut-64-restore-g0.75")
    visual = layout.positions[0, layout.is_visual[0]] - at
    medians = []
    for token in range(64):
        patches = sorted((merged.source[0] == token).nonzero().flatten().tolist())
        medians.append(patches[(len(patches) - 1) // 2])
    assert visual.tolist() == sorted(medians)
    assert float(layout.sizes[layout.is_visual].sum()) == N_PATCHES
    assert generated.shape[1] >= 1


def test_flowcut_budget_checks(small_checkpoint, model):
    from llava_patches.family import FAMILY

    FAMILY.check_budget(str(small_checkpoint), restore.resolve_settings("FlowCut", 64, True, 576))
    restore.apply(model, base="FlowCut", n_vis=1)  # any budget: one stage reaches it
    with pytest.raises(ValueError, match="n_vis must be an integer"):
        restore.apply(model, base="FlowCut", n_vis=0)


# --------------------------------------------------------------------------------------------------
# Against the official code (optional)
# --------------------------------------------------------------------------------------------------

OFFICIAL_DIR = os.environ.get("FLOWCUT_OFFICIAL_DIR")


def _official():
    """The official CLIP functions (flowcut/modeling_clip_flowcut.py), imported without its package's
    __init__ (which patches llava and transformers globally)."""
    root = os.path.join(OFFICIAL_DIR, "flowcut")
    if "official_flowcut" not in sys.modules:
        package = types.ModuleType("official_flowcut")
        package.__path__ = [root]
        sys.modules["official_flowcut"] = package
    return importlib.import_module("official_flowcut.modeling_clip_flowcut")


def _official_tower(vision, n_vis):
    """A copy of the tower's CLIP running the official functions (bound to these instances only)."""
    official = _official()
    clip = copy.deepcopy(vision.vision_tower)
    model = clip.vision_model
    for layer in model.encoder.layers:
        layer.forward = types.MethodType(official.CLIPEncoderLayer_forward, layer)
        layer.self_attn.forward = types.MethodType(official.CLIPAttention_forward, layer.self_attn)
    model.encoder.forward = types.MethodType(official.CLIPEncoder_forward, model.encoder)
    model.forward = types.MethodType(official.CLIPVisionTransformer_forward, model)
    official.apply_flowcut_config(clip, target_tokens=n_vis + 1)  # what flowcut(model, target_num=n_vis) sets
    return model


@pytest.mark.skipif(not OFFICIAL_DIR, reason="set FLOWCUT_OFFICIAL_DIR to a checkout of TungChintao/FlowCut")
@pytest.mark.parametrize("name,n_vis", [("tower", 64), ("tower8", 64), ("tower8", 128), ("tower24", 192),
                                        ("tower24", 128), ("tower24", 64), ("tower24", 37)])
def test_identical_to_official_code(request, images, name, n_vis):
    vision = _towers(request, name)
    official = _official_tower(vision, n_vis)
    with torch.no_grad():
        for b in range(images.shape[0]):
            outputs, keep = official(images[b:b + 1], output_hidden_states=True, output_attentions=True)
            features = outputs.hidden_states[vision.select_layer][:, 1:]
            mine = encode_in_encoder(vision, images[b:b + 1], FlowCutInEncoder(), n_vis)
            kept = (mine.source[0] >= 0).nonzero().flatten()
            assert torch.equal(kept, keep[0])
            assert torch.equal(mine.features, features)
        # a batch: the official code prunes every image by the batch's largest count, as the patched
        # tower's own forward does (encode_in_encoder runs each image alone instead)
        outputs, keep = official(images, output_hidden_states=True, output_attentions=True)
        try:
            apply_encoder_method(vision, FlowCutInEncoder(), n_vis)
            batched = vision(images)
        finally:
            remove_encoder_method(vision)
        assert torch.equal(batched, outputs.hidden_states[vision.select_layer][:, 1:])


# --------------------------------------------------------------------------------------------------
# Through a benchmark entry point, batched (as scripts/llava1_5/<bench>.sh runs it)
# --------------------------------------------------------------------------------------------------

data, in_process = test_batching.data, test_batching.in_process  # its fixtures, used here too


@pytest.mark.parametrize("bench", ["gqa", "mmbench"])
def test_flowcut_batches_answer_as_batch_one(bench, data, tmp_path, in_process):
    """--base FlowCut [--restore]: each image is pruned on its own whatever the batch."""
    for config in (["--base", "FlowCut", "--n_vis", "64"], ["--base", "FlowCut", "--n_vis", "64", "--restore"],
                   ["--base", "FlowCut", "--n_vis", "64", "--restore", "--prune_ratio", "0.75"]):
        runs = test_batching.batched_runs(bench, data, tmp_path, in_process, config, (1, 4))
        assert runs[4][0] == runs[1][0], (bench, config)
        assert max(b[0] for b in runs[4][1]) == 4


@pytest.mark.parametrize("use_restore", [False, True])
def test_token_map_and_bench_rows(small_model, prompt, use_restore):
    from restore import bench
    from restore.analysis.models import BenchModel
    from restore.analysis.timing import Timer
    from restore.analysis.token_map import build_token_map

    tok, model, proc = small_model
    loaded = BenchModel(tok, model, proc, "small checkpoint")
    _, images = prompt
    token_map = build_token_map(loaded, images, "FlowCut", 64, use_restore)
    sizes = token_map.group_sizes()
    if use_restore:
        assert (token_map.source >= 0).all() and int(sizes.sum()) == N_PATCHES
    else:
        assert int((token_map.source >= 0).sum()) == 64 and len(token_map.kept) == 64
    config = bench.Config("FlowCut", 64, use_restore)
    timer = Timer(torch.device("cpu"), repeats=1, warmup=0)
    tokens = bench.visual_tokens(loaded, images)
    row = bench.time_reduction(tokens, config, timer, loaded, bench.Prompt(None, images, None))
    assert row == {"selection_ms": None, "merging_ms": None, "reduce_ms": None}
    assert bench.time_vision_encoder_method(loaded, bench.Prompt(None, images, None), config, timer) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [None, 0.5])
def test_half_precision_towers(tower8, images, dtype, gamma):
    half = copy.deepcopy(tower8).to(dtype)
    method = FlowCutInEncoder() if gamma is None else FlowCutInEncoder(gamma, "distinctive")
    out = encode_in_encoder(half, images[:2].to(dtype), method, 64)
    assert out.features.dtype == dtype and out.features.shape == (2, 64, half.hidden_size)
    assert torch.isfinite(out.features).all()
    assert torch.equal(out.sizes.sum(dim=1), torch.full((2,), 64.0 if gamma is None else float(N_PATCHES)))
