"""Distinctive anchor merging, retained positions and the attention bias, on small tensors."""
import math

import pytest
import torch

import tokenreduction as tr
from restore.attention import decode_bias, distance_bias, prefill_bias, rope_decay
from restore.merge import anchor_merge, anchor_scores, group_medians
from restore.reduce import reduce_visual_tokens, retained_budget


def reference_anchor_merge(x: torch.Tensor, k: int):
    """Literal per-token restatement of the official merging rule for one sample [M, D]."""
    M = x.shape[0]
    unit = x / x.norm(dim=-1, keepdim=True)
    sim = unit @ unit.T
    density = sim.sum(dim=-1)
    score = torch.empty(M)
    for i in range(M):
        sparser = [sim[i, j].item() for j in range(M) if density[j] < density[i]]
        delta = max(sparser) if sparser else 0.0
        score[i] = density[i] * (1 - delta)
    anchors = sorted(score.topk(k).indices.tolist())
    groups = {a: [a] for a in anchors}
    for i in range(M):
        if i not in groups:
            best = max(anchors, key=lambda a: (sim[i, a].item(), -a))
            groups[best].append(i)
    return anchors, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 10, 20])
def test_anchor_merge_matches_reference(seed, k):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 20, 8, generator=g, dtype=torch.float64)
    out = anchor_merge(x, k)
    for b in range(2):
        anchors, groups = reference_anchor_merge(x[b], k)
        assert out.anchors[b].tolist() == anchors
        for gi, a in enumerate(anchors):
            members = sorted(groups[a])
            assert sorted((out.group_of[b] == gi).nonzero().flatten().tolist()) == members
            assert out.sizes[b, gi].item() == len(members)
            torch.testing.assert_close(out.features[b, gi], x[b, members].mean(dim=0))
    assert torch.equal(out.sizes.sum(dim=1), torch.full((2,), 20.0))


def test_anchor_scores_hand_computed():
    # Three unit vectors: a and b close, c orthogonal to both.
    x = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]])
    sim, score = anchor_scores(x)
    density = torch.tensor([1.0 + 0.8 + 0.0, 0.8 + 1.0 + 0.6, 0.0 + 0.6 + 1.0])  # 1.8, 2.4, 1.6
    # b is densest: its delta is max(sim to a, sim to c) = 0.8; a: only c is sparser -> 0; c is sparsest -> 0.
    expected = density * torch.tensor([1 - 0.0, 1 - 0.8, 1 - 0.0])
    torch.testing.assert_close(score[0], expected)


def test_group_medians_lower_middle():
    positions = torch.tensor([[3, 5, 7, 9, 11, 20]])
    group_of = torch.tensor([[0, 1, 0, 1, 1, 0]])
    # group 0: 3, 7, 20 -> 7; group 1: 5, 9, 11 -> 9
    assert group_medians(positions, group_of, 2).tolist() == [[7, 9]]
    # even count: 4 members, lower middle is the 2nd smallest
    assert group_medians(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[0, 0, 0, 0]]), 1).tolist() == [[2]]


def test_rope_decay_and_distance_bias_hand_values():
    d = torch.tensor([0, 1, 5])
    # head_dim 2: one frequency theta_0 = 1, so rho(d) = cos(d)
    torch.testing.assert_close(rope_decay(d, head_dim=2), torch.cos(d.float()))
    pos = torch.tensor([[0, 1, 5]])
    bias = distance_bias(pos, torch.float32, head_dim=2)
    assert bias[0, 2, 0].item() == pytest.approx(math.log(2 - math.cos(5)), rel=1e-6)
    assert bias[0, 2, 1].item() == pytest.approx(math.log(2 - math.cos(4)), rel=1e-6)
    assert torch.all(bias[0].diagonal() == 0)
    # head dim 128 as in LLaVA-7B: rho(0) = 1 and |rho| <= 1, so the bias is finite and >= 0
    full = distance_bias(torch.arange(700).unsqueeze(0), torch.float32)
    assert torch.isfinite(full).all() and (full >= 0).all()


def test_prefill_and_decode_bias_masks():
    pos = torch.tensor([[0, 3, 4], [0, 0, 1]])
    log_sizes = torch.log(torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 4.0]]))
    valid = torch.tensor([[True, True, True], [False, True, True]])  # left padding in sample 1
    m = prefill_bias(pos, log_sizes, valid, torch.float32, head_dim=2)
    assert m.shape == (2, 1, 3, 3)
    low = torch.finfo(torch.float32).min
    assert m[0, 0, 0, 1] == low and m[0, 0, 1, 2] == low  # future keys
    assert m[1, 0, 1, 0] == low and m[1, 0, 2, 0] == low  # padding key
    assert m[1, 0, 0, 0] == 0  # a padded query keeps its own key, so its row stays finite
    expected = math.log(2.0) + math.log(2 - math.cos(1))  # query at 4, key of size 2 at 3
    assert m[0, 0, 2, 1].item() == pytest.approx(expected, rel=1e-6)
    d = decode_bias(torch.cat([log_sizes, torch.zeros(2, 1)], 1), torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], 1), torch.float16)
    assert d.shape == (2, 1, 1, 4) and d.dtype == torch.float16
    assert d[1, 0, 0, 0] == torch.finfo(torch.float16).min
    assert d[1, 0, 0, 2].item() == pytest.approx(math.log(4.0), rel=1e-3)


def _tokens(seed, B=2, N=576, D=32):
    g = torch.Generator().manual_seed(seed)
    return tr.VisualTokens(
        features=torch.randn(B, N, D, generator=g),
        raw_features=torch.randn(B, N, 16, generator=g),
        cls_attention=torch.softmax(3 * torch.randn(B, N, generator=g), dim=-1),
    )


@pytest.mark.parametrize("base", ["HoloV", "DivPrune", "VisPruner"])
@pytest.mark.parametrize("n_vis", [2, 64, 101, 192])
def test_reduce_invariants(base, n_vis):
    tokens = _tokens(n_vis)
    out = reduce_visual_tokens(tokens, base, n_vis, restore=True)
    assert out.features.shape == (2, n_vis, 32)
    assert torch.equal(out.sizes.sum(dim=1), torch.full((2,), 576.0))
    assert (out.positions.diff(dim=1) > 0).all()  # strictly increasing retained positions
    keep = tr.get_selector(base)(tokens, retained_budget(n_vis, True))
    # the source map sends every patch to one output token, and group sizes count those patches
    counts = torch.zeros(2, n_vis).scatter_add_(1, out.source, torch.ones(2, 576))
    assert torch.equal(counts, out.sizes)
    assert torch.equal(out.positions.gather(1, out.source.gather(1, out.positions)), out.positions)
    for b in range(2):
        kept = set(keep[b].tolist())
        singles = {p for p, s in zip(out.positions[b].tolist(), out.sizes[b].tolist()) if p in kept}
        assert singles == kept  # every kept token is there at its own position
        for p, s, f in zip(out.positions[b].tolist(), out.sizes[b].tolist(), out.features[b]):
            if p in kept:
                assert s == 1.0 and torch.equal(f, tokens.features[b, p])


def test_reduce_without_restore_keeps_base_order():
    tokens = _tokens(0)
    out = reduce_visual_tokens(tokens, "DivPrune", 64, restore=False)
    keep = tr.get_selector("DivPrune")(tokens, 64)
    assert torch.equal(out.positions, keep)
    assert torch.equal(out.features, tokens.features.gather(1, keep.unsqueeze(-1).expand(-1, -1, 32)))
    assert torch.all(out.sizes == 1)
    assert (out.source >= 0).sum() == 2 * 64 and torch.equal(out.source.gather(1, keep), torch.arange(64).expand(2, 64))


def test_reduce_batch_equals_per_sample():
    tokens = _tokens(3, B=3)
    full = reduce_visual_tokens(tokens, "HoloV", 64, restore=True)
    for b in range(3):
        one = tr.VisualTokens(tokens.features[b:b + 1], tokens.raw_features[b:b + 1], tokens.cls_attention[b:b + 1])
        alone = reduce_visual_tokens(one, "HoloV", 64, restore=True)
        assert torch.equal(alone.positions[0], full.positions[b])
        torch.testing.assert_close(alone.features[0], full.features[b])
