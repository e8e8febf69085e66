"""ToMe: the batched functions against a loop-by-loop restatement of the algorithm, the schedule,
and ToMe inside LLaVA's CLIP tower (small checkpoint) against a loop-by-loop tower.

The restatement below follows the ToMe paper / official code's algorithm one token at a time in
float64 Python; it shares no code with tokenreduction.tome. Set TOME_OFFICIAL_DIR to a checkout of
github.com/facebookresearch/ToMe (a directory with tome/merge.py) to also compare with the official
functions themselves; that test is skipped otherwise.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os
from pathlib import Path
from typing import List

import pytest
import torch

from llava_patches.tome import ToMeTokens, apply_tome, encode_with_tome, is_tome_applied, remove_tome
from llava_patches.vision import encode_with_cls_attention
from restore.small_checkpoint import synthetic_image
from tokenreduction.tome import (
    bipartite_soft_matching,
    max_reduction,
    merge_assignment,
    merge_source,
    merge_weighted,
    tome_schedule,
)

N_PATCHES = 576


# --------------------------------------------------------------------------------------------------
# Loop-by-loop restatement
# --------------------------------------------------------------------------------------------------


def reference_match(metric: torch.Tensor, r: int, protect_cls: bool) -> List[List[int]]:
    """One sample, metric [t, D]. Returns the merged sequence as lists of members (positions in the
    input sequence), in output order; a merged token lists its B token first."""
    t = metric.shape[0]
    rows = [[float(v) for v in metric[i].double()] for i in range(t)]
    unit = []
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        unit.append([v / norm for v in row])
    set_a = list(range(0, t, 2))
    set_b = list(range(1, t, 2))
    r = min(r, (t - (1 if protect_cls else 0)) // 2)
    if r <= 0:
        return [[i] for i in range(t)]

    best_score, best_partner = [], []
    for ai, a in enumerate(set_a):
        if protect_cls and ai == 0:
            best_score.append(-math.inf)
            best_partner.append(0)
            continue
        top, top_j = -math.inf, 0
        for bj, b in enumerate(set_b):
            score = sum(x * y for x, y in zip(unit[a], unit[b]))
            if score > top:  # first maximum wins
                top, top_j = score, bj
        best_score.append(top)
        best_partner.append(top_j)

    ranking = sorted(range(len(set_a)), key=lambda ai: -best_score[ai])
    merged_away = ranking[:r]
    kept = ranking[r:]
    if protect_cls:
        kept = sorted(kept)
    out = [[set_a[ai]] for ai in kept]
    for bj, b in enumerate(set_b):
        out.append([b] + [set_a[ai] for ai in merged_away if best_partner[ai] == bj])
    return out


def reference_weighted(x: torch.Tensor, size: torch.Tensor, groups: List[List[int]]):
    """x [t, C], size [t] -> size-weighted mean per group, summed sizes (float64)."""
    xs, sizes = [], []
    for members in groups:
        total = sum(float(size[m]) for m in members)
        xs.append(sum(x[m].double() * float(size[m]) for m in members) / total)
        sizes.append(total)
    return torch.stack(xs), torch.tensor(sizes, dtype=torch.float64)


def reference_tower(vision_tower, image: torch.Tensor, n_vis: int):
    """ToMe in LLaVA's CLIP for one image [3, H, W], every layer written out: attention per head
    with log sizes added to the logits, the keys averaged over heads as the metric, the reference
    match and weighted merge, the MLP. Returns (features [n_vis, C], sizes [n_vis], members of each
    token as patch lists, cls_attention [n_vis])."""
    clip = vision_tower.vision_tower.vision_model
    layers = clip.encoder.layers
    n_run = vision_tower.select_layer % (len(layers) + 1)
    x = clip.pre_layrnorm(clip.embeddings(image[None].to(vision_tower.dtype)))[0]
    schedule = tome_schedule(x.shape[0] - 1, n_vis, n_run)
    size = torch.ones(x.shape[0], dtype=torch.float64)
    members = [[p] for p in range(x.shape[0])]  # original positions, CLS = 0
    cls_attention = None
    for index in range(n_run):
        layer = layers[index]
        attn = layer.self_attn
        heads, t = attn.num_heads, x.shape[0]
        h = layer.layer_norm1(x)
        q = (attn.q_proj(h) * attn.scale).view(t, heads, -1)
        k = attn.k_proj(h).view(t, heads, -1)
        v = attn.v_proj(h).view(t, heads, -1)
        head_outputs, cls_rows = [], []
        for hd in range(heads):
            logits = q[:, hd] @ k[:, hd].T + size.log().float()[None, :]
            probs = torch.softmax(logits, dim=-1)
            cls_rows.append(probs[0])
            head_outputs.append(probs @ v[:, hd])
        x = x + attn.out_proj(torch.cat(head_outputs, dim=-1))

        groups = reference_match(k.mean(dim=1), schedule[index], protect_cls=True)
        if index == n_run - 1:
            cls_row = torch.stack(cls_rows).mean(dim=0).double()
            cls_attention = torch.stack([cls_row[g].sum() for g in groups])
        x64, size = reference_weighted(x, size, groups)
        x = x64.float()
        members = [sum((members[m] for m in g), []) for g in groups]
        x = x + layer.mlp(layer.layer_norm2(x))
    assert members[0] == [0], "CLS must stay first and alone"
    patches = [[p - 1 for p in m] for m in members[1:]]
    return x[1:], size[1:], patches, cls_attention[1:]


def groups_of(matching, sample: int) -> List[List[int]]:
    """The batched matching of one sample as member lists (B token first, then its A tokens in
    merge order), the same form as reference_match."""
    t = matching.num_tokens
    if matching.is_identity:
        return [[i] for i in range(t)]
    kept = [2 * int(i) for i in matching.unmerged[sample]]
    out = [[i] for i in kept]
    joined = {j: [] for j in range(t // 2)}
    for a, b in zip(matching.src[sample].tolist(), matching.dst[sample].tolist()):
        joined[b].append(2 * a)
    for j in range(t // 2):
        out.append([2 * j + 1] + joined[j])
    return out


def same_groups(mine: List[List[int]], ref: List[List[int]]) -> bool:
    return [sorted(g) for g in mine] == [sorted(g) for g in ref]


# --------------------------------------------------------------------------------------------------
# Batched functions vs the restatement
# --------------------------------------------------------------------------------------------------

CASES = [  # (t, r): t counts CLS; r includes 0, 1, the cap and above the cap (clipped)
    (17, 0), (17, 1), (17, 8), (17, 20), (50, 5), (50, 24), (101, 33), (577, 23), (577, 288),
]


@pytest.mark.parametrize("t,r", CASES)
@pytest.mark.parametrize("protect_cls", [True, False])
def test_matching_and_merge_match_reference(t, r, protect_cls):
    g = torch.Generator().manual_seed(1000 * t + r + protect_cls)
    batch, dim, channels = 3, 16, 8
    metric = torch.randn(batch, t, dim, generator=g)
    x = torch.randn(batch, t, channels, generator=g)
    size = torch.randint(1, 6, (batch, t), generator=g).float()

    matching = bipartite_soft_matching(metric, r, protect_cls=protect_cls)
    assert matching.r == min(r, max_reduction(t, protect_cls))
    merged, merged_size = merge_weighted(x, size, matching)
    assert merged.shape == (batch, t - matching.r, channels) and merged.dtype == torch.float32
    assert merged_size.dtype == torch.float32
    source = merge_source(None, matching)
    assignment = merge_assignment(None, matching)
    for b in range(batch):
        ref = reference_match(metric[b], r, protect_cls)
        mine = groups_of(matching, b)
        assert same_groups(mine, ref), f"sample {b}: different merges"
        ref_x, ref_size = reference_weighted(x[b], size[b], ref)
        assert torch.equal(merged_size[b].double(), ref_size)  # integer sizes: exact
        torch.testing.assert_close(merged[b].double(), ref_x, rtol=1e-6, atol=1e-6)
        # both forms of source tracking list the same members
        for i, g_ in enumerate(ref):
            assert sorted(torch.nonzero(source[b, i]).flatten().tolist()) == sorted(g_)
            assert all(int(assignment[b, m]) == i for m in g_)


def test_protected_cls_stays_first_and_alone():
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(4, 41, 8, generator=g)
    metric[:, 0] = metric[:, 2]  # CLS identical to another token: still never merged
    matching = bipartite_soft_matching(metric, 20)
    assert torch.equal(matching.unmerged[:, 0], torch.zeros(4, dtype=torch.long))
    assert torch.equal(matching.token_map()[:, 0], torch.zeros(4, dtype=torch.long))
    assert (matching.token_map()[:, 1:] > 0).all()


def test_identity_when_nothing_to_merge():
    x = torch.randn(2, 9, 4)
    for r in (0, -3):
        matching = bipartite_soft_matching(x, r)
        assert matching.is_identity
        assert matching.merge(x) is x
        out, size = merge_weighted(x, None, matching)
        assert out is x and torch.equal(size, torch.ones(2, 9))
    assert bipartite_soft_matching(torch.randn(2, 2, 4), 5).is_identity  # CLS + 1 token


def test_batch_equals_per_sample():
    g = torch.Generator().manual_seed(7)
    metric = torch.randn(5, 301, 32, generator=g)
    x = torch.randn(5, 301, 24, generator=g)
    size = torch.randint(1, 9, (5, 301), generator=g).float()
    matching = bipartite_soft_matching(metric, 97)
    merged, merged_size = merge_weighted(x, size, matching)
    start = torch.randint(0, 301, (5, 50), generator=g)
    assignment = merge_assignment(start, matching)
    for b in range(5):
        one = bipartite_soft_matching(metric[b:b + 1], 97)
        for name in ("unmerged", "src", "dst"):
            assert torch.equal(getattr(one, name), getattr(matching, name)[b:b + 1])
        one_x, one_size = merge_weighted(x[b:b + 1], size[b:b + 1], one)
        assert torch.equal(one_x, merged[b:b + 1]) and torch.equal(one_size, merged_size[b:b + 1])
        assert torch.equal(merge_assignment(start[b:b + 1], one), assignment[b:b + 1])


def test_unmerge_and_assignment_agree():
    g = torch.Generator().manual_seed(11)
    metric = torch.randn(2, 64, 8, generator=g)
    first = bipartite_soft_matching(metric, 20)
    second = bipartite_soft_matching(first.merge(metric), 12)
    values = torch.randn(2, 64 - 32, 3, generator=g)
    spread = first.unmerge(second.unmerge(values))
    assignment = merge_assignment(merge_assignment(None, first), second)
    assert torch.equal(spread, values.gather(1, assignment[..., None].expand(-1, -1, 3)))
    source = merge_source(merge_source(None, first), second)
    assert torch.equal(source.argmax(dim=1), assignment)
    assert torch.equal(source.sum(dim=1), torch.ones(2, 64))


def test_weighted_merge_in_half_precision_does_not_overflow():
    x = torch.full((1, 9, 2), 300.0, dtype=torch.float16)
    size = torch.full((1, 9), 250.0)
    matching = bipartite_soft_matching(torch.randn(1, 9, 4), 4)
    out, out_size = merge_weighted(x, size, matching)
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and (out == 300).all()
    assert out_size.sum() == 9 * 250


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------


def test_schedule_for_llava_budgets():
    # CLIP ViT-L/14-336, select layer -2: 576 patches through 23 layers
    assert tome_schedule(576, 64, 23) == [23] * 6 + [22] * 17
    assert tome_schedule(576, 128, 23) == [20] * 11 + [19] * 12
    assert tome_schedule(576, 192, 23) == [17] * 16 + [16] * 7
    assert tome_schedule(576, 576, 23) == [0] * 23


@pytest.mark.parametrize("num_tokens,num_layers", [(576, 23), (576, 2), (576, 6), (100, 3), (7, 5), (576, 0)])
def test_schedule_invariants(num_tokens, num_layers):
    for n_vis in range(1, num_tokens + 1):
        feasible = num_tokens <= n_vis * 2 ** num_layers
        if not feasible:
            with pytest.raises(ValueError, match="at most half"):
                tome_schedule(num_tokens, n_vis, num_layers)
            continue
        schedule = tome_schedule(num_tokens, n_vis, num_layers)
        assert len(schedule) == num_layers and sum(schedule) == num_tokens - n_vis
        tokens = num_tokens
        for r in schedule:
            assert 0 <= r <= tokens // 2  # never more than half the mergeable tokens
            tokens -= r
        # the constant schedule (remainder first) whenever its layers respect the halving cap
        if num_layers:
            q, extra = divmod(num_tokens - n_vis, num_layers)
            constant = [q + 1] * extra + [q] * (num_layers - extra)
            tokens, fits = num_tokens, True
            for r in constant:
                fits &= r <= tokens // 2
                tokens -= r
            if fits:
                assert schedule == constant


@pytest.mark.parametrize("args", [(576, 0, 23), (576, 577, 23), (576, 143, 2), (-1, 1, 2), (576, 1, -1)])
def test_schedule_errors(args):
    with pytest.raises(ValueError):
        tome_schedule(*args)


# --------------------------------------------------------------------------------------------------
# Official code (optional)
# --------------------------------------------------------------------------------------------------


def _official_merge_module():
    root = os.environ.get("TOME_OFFICIAL_DIR")
    path = Path(root or "/nonexistent") / "tome" / "merge.py"
    if not path.is_file():
        pytest.skip("set TOME_OFFICIAL_DIR to a checkout of facebookresearch/ToMe")
    spec = importlib.util.spec_from_file_location("official_tome_merge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("t,r", CASES)
@pytest.mark.parametrize("protect_cls", [True, False])
def test_identical_to_official_code(t, r, protect_cls):
    official = _official_merge_module()
    g = torch.Generator().manual_seed(t * 31 + r)
    metric = torch.randn(3, t, 16, generator=g)
    x = torch.randn(3, t, 8, generator=g)
    size = torch.randint(1, 6, (3, t), generator=g).float()

    merge, unmerge = official.bipartite_soft_matching(metric, r, class_token=protect_cls)
    matching = bipartite_soft_matching(metric, r, protect_cls=protect_cls)
    for mode in ("mean", "sum", "amax"):
        assert torch.equal(merge(x, mode=mode), matching.merge(x, mode=mode))
    small = matching.merge(x)
    assert torch.equal(unmerge(small), matching.unmerge(small))
    if matching.is_identity:
        return  # with nothing to merge (r = 0) the reference code does no weighted merge or source tracking
    ox, osize = official.merge_wavg(merge, x, size[..., None])
    mx, msize = merge_weighted(x, size, matching)
    assert torch.equal(ox, mx) and torch.equal(osize[..., 0], msize)
    assert torch.equal(official.merge_source(merge, x), merge_source(None, matching))


# --------------------------------------------------------------------------------------------------
# ToMe in LLaVA's CLIP tower (small checkpoint)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(small_model):
    processor = small_model.image_processor
    pixels = processor(images=[synthetic_image(s) for s in (1, 2, 3)], return_tensors="pt")["pixel_values"]
    return pixels.float()


@pytest.fixture(scope="module")
def tower(small_model):
    return small_model.model.get_model().get_vision_tower()


@pytest.fixture(scope="module")
def deep_tower(tower):
    """The small tower with 8 CLIP layers (7 up to the select layer): 576 patches can then reach
    64 tokens (the small checkpoint's 2 layers can halve only twice, to 144). The extra layers are
    copies of the small ones with a seeded perturbation, so no two layers are alike."""
    deep = copy.deepcopy(tower)
    layers = deep.vision_tower.vision_model.encoder.layers
    g = torch.Generator().manual_seed(5)
    for i in range(8 - len(layers)):
        layer = copy.deepcopy(layers[i % len(layers)])
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        layers.append(layer)
    deep.vision_tower.config.num_hidden_layers = len(layers)
    return deep


def check_invariants(out: ToMeTokens, batch: int, n_vis: int, channels: int) -> None:
    assert out.features.shape == (batch, n_vis, channels) and out.features.dtype == torch.float32
    assert out.sizes.shape == (batch, n_vis) and out.sizes.dtype == torch.float32
    assert out.source.shape == (batch, N_PATCHES) and out.source.dtype == torch.long
    assert out.cls_attention.shape == (batch, n_vis) and out.cls_attention.dtype == torch.float32
    assert torch.equal(out.sizes.sum(dim=1), torch.full((batch,), float(N_PATCHES)))
    assert (out.sizes >= 1).all()
    counts = torch.stack([torch.bincount(s, minlength=n_vis) for s in out.source]).float()
    assert torch.equal(counts, out.sizes)  # every token stands for exactly the patches pointing to it
    assert (out.cls_attention >= 0).all() and (out.cls_attention.sum(dim=1) <= 1 + 1e-5).all()


def test_full_budget_is_stock(tower, images):
    out = encode_with_tome(tower, images, N_PATCHES)
    stock_features, stock_attention = encode_with_cls_attention(tower, images)
    assert torch.equal(out.features, tower(images))  # LLaVA's own forward
    assert torch.equal(out.features, stock_features)
    assert torch.equal(out.cls_attention, stock_attention)
    assert torch.equal(out.sizes, torch.ones(3, N_PATCHES))
    assert torch.equal(out.source, torch.arange(N_PATCHES).expand(3, -1))
    assert not is_tome_applied(tower)


@pytest.mark.parametrize("n_vis", [144, 192, 193, 301, 575])
def test_small_checkpoint_budgets(tower, images, n_vis):
    out = encode_with_tome(tower, images, n_vis)
    check_invariants(out, 3, n_vis, tower.hidden_size)
    assert not is_tome_applied(tower)


def test_unreachable_budget_raises_before_running(tower, images):
    with pytest.raises(ValueError, match="at least 144 remain"):
        encode_with_tome(tower, images, 64)
    assert not is_tome_applied(tower)


@pytest.mark.parametrize("n_vis", [64, 128, 192, 77])
def test_deep_tower_matches_loop_reference(deep_tower, images, n_vis):
    out = encode_with_tome(deep_tower, images, n_vis)
    check_invariants(out, 3, n_vis, deep_tower.hidden_size)
    for b in range(images.shape[0]):
        features, sizes, patches, cls_attention = reference_tower(deep_tower, images[b], n_vis)
        assert torch.equal(out.sizes[b].double(), sizes)
        for token, members in enumerate(patches):
            assert sorted(torch.nonzero(out.source[b] == token).flatten().tolist()) == sorted(members)
        torch.testing.assert_close(out.features[b], features, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.cls_attention[b].double(), cls_attention, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_vis", [64, 193])
def test_batch_equals_per_sample_in_tower(deep_tower, images, n_vis):
    out = encode_with_tome(deep_tower, images, n_vis)
    for b in range(images.shape[0]):
        one = encode_with_tome(deep_tower, images[b:b + 1], n_vis)
        assert torch.equal(one.source, out.source[b:b + 1])
        assert torch.equal(one.sizes, out.sizes[b:b + 1])
        torch.testing.assert_close(one.features, out.features[b:b + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one.cls_attention, out.cls_attention[b:b + 1], rtol=1e-5, atol=1e-7)


def _stock_state(tower):
    layers = tower.vision_tower.vision_model.encoder.layers
    return [(type(layer), dict(layer.self_attn.k_proj._forward_hooks), sorted(vars(layer))) for layer in layers]


def test_apply_then_remove_gives_stock_back(deep_tower, images):
    before_state = _stock_state(deep_tower)
    before = deep_tower(images)
    run = apply_tome(deep_tower, 100)
    try:
        assert is_tome_applied(deep_tower)
        assert apply_tome(deep_tower, 128) is run  # re-applying changes the budget only
        # LLaVA's own forward (all 8 layers, hidden_states[-2]) now gives ToMe's tokens
        patched = deep_tower(images)
        assert patched.shape == (3, 128, deep_tower.hidden_size)
        torch.testing.assert_close(patched, encode_with_tome(deep_tower, images, 128).features)
        assert is_tome_applied(deep_tower)  # encode_with_tome leaves an existing patch on
    finally:
        remove_tome(deep_tower)
    assert not is_tome_applied(deep_tower)
    assert _stock_state(deep_tower) == before_state
    assert torch.equal(deep_tower(images), before)
    assert remove_tome(deep_tower) is deep_tower  # removing twice is harmless
