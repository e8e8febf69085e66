"""The built-in selectors against their loop-based restatements, plus invariants and errors."""
from __future__ import annotations

import pytest
import torch

import tokenreduction as tr
from tokenreduction.holov import N_CROPS
from tokenreduction.reference import REFERENCES, divprune_reference

SELECTORS = sorted(REFERENCES)
# 576 = the LLaVA-1.5 grid (16 equal crops); 37 = odd and not a multiple of 16 (uneven crops).
SIZES = (576, 37)


def make_tokens(batch: int, n: int, seed: int, dtype: torch.dtype = torch.float32, dim: int = 64) -> tr.VisualTokens:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, dim, generator=g)
    raw = torch.randn(batch, n, dim // 2, generator=g)
    # Peaked like a trained CLIP's CLS attention, so attention ranks are well separated.
    attention = torch.softmax(3 * torch.randn(batch, n, generator=g), dim=-1)
    return tr.VisualTokens(features=features.to(dtype), raw_features=raw.to(dtype), cls_attention=attention)


def budgets(n: int):
    return sorted({1, 2, 7, 32, n // 2, n - 1, n} & set(range(1, n + 1)))


def crop_of(n: int) -> torch.Tensor:
    """Crop number of every token: 16 consecutive crops, the first n % 16 one token longer."""
    base, extra = divmod(n, N_CROPS)
    sizes = [base + (c < extra) for c in range(N_CROPS)]
    return torch.repeat_interleave(torch.arange(N_CROPS), torch.tensor(sizes))


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_for_every_budget_kind(name, n, seed):
    tokens = make_tokens(1, n, seed)
    select = tr.get_selector(name)
    for n_keep in budgets(n):
        expected = REFERENCES[name](tokens, n_keep)
        assert torch.equal(select(tokens, n_keep), expected), f"{name} N={n} n_keep={n_keep} seed={seed}"


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("n", SIZES)
def test_batch_equals_each_sample_alone(name, n):
    tokens = make_tokens(3, n, seed=5)
    select = tr.get_selector(name)
    for n_keep in (7, n // 2):
        batched = select(tokens, n_keep)
        for b in range(3):
            alone = tr.VisualTokens(
                features=tokens.features[b : b + 1],
                raw_features=tokens.raw_features[b : b + 1],
                cls_attention=tokens.cls_attention[b : b + 1],
            )
            assert torch.equal(batched[b : b + 1], select(alone, n_keep)), f"{name} sample {b}"
        # Samples differ, so their selections should too: the batch is not collapsed to one sample.
        assert not torch.equal(batched[0], batched[1])


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("n", SIZES)
def test_output_is_n_keep_distinct_indices_in_range(name, n):
    tokens = make_tokens(2, n, seed=3)
    for n_keep in budgets(n):
        keep = tr.get_selector(name)(tokens, n_keep)
        assert keep.dtype == torch.long and keep.shape == (2, n_keep)
        assert int(keep.min()) >= 0 and int(keep.max()) < n
        for row in keep:
            assert len(set(row.tolist())) == n_keep
    assert torch.equal(tr.get_selector(name)(tokens, n).sort(dim=1).values, torch.arange(n).expand(2, n))


@pytest.mark.parametrize("n", SIZES)
def test_vispruner_returns_ascending_indices(n):
    tokens = make_tokens(2, n, seed=4)
    for n_keep in budgets(n):
        keep = tr.get_selector("VisPruner")(tokens, n_keep)
        assert bool((keep[:, 1:] > keep[:, :-1]).all())


@pytest.mark.parametrize("n", SIZES)
def test_vispruner_keeps_the_top_attention_half(n):
    tokens = make_tokens(2, n, seed=6)
    n_keep = 32
    keep = tr.get_selector("VisPruner")(tokens, n_keep)
    top = tokens.cls_attention.topk(n_keep // 2, dim=1).indices
    for kept, wanted in zip(keep, top):
        assert set(wanted.tolist()) <= set(kept.tolist())


@pytest.mark.parametrize("n", SIZES)
def test_holov_order_is_crop_by_crop(n):
    tokens = make_tokens(2, n, seed=7)
    crop = crop_of(n)
    for n_keep in budgets(n):
        keep = tr.get_selector("HoloV")(tokens, n_keep)
        for b, row in enumerate(keep):
            crops = crop[row]
            assert bool((crops[1:] >= crops[:-1]).all()), "crops must come in order"
            for c in crops.unique():
                members = row[crops == c]
                if len(members) == int((crop == c).sum()):  # fully kept: the crop's own order
                    assert bool((members[1:] > members[:-1]).all())
                else:  # partly kept: descending attention, and the crop's best tokens
                    attention = tokens.cls_attention[b, members]
                    assert bool((attention[1:] < attention[:-1]).all())
                    inside = tokens.cls_attention[b, crop == c]
                    assert float(attention.min()) == float(inside.topk(len(members)).values.min())


@pytest.mark.parametrize("name", ["HoloV", "VisPruner"])
@pytest.mark.parametrize("n", SIZES)
def test_tied_attention_is_ordered_like_the_reference(name, n):
    # Attention with many exact ties (as half-precision attention has): sorting and top-k order
    # tied values in implementation-defined ways, and the selectors must follow the official calls.
    tokens = make_tokens(2, n, seed=11)
    g = torch.Generator().manual_seed(11)
    tokens.cls_attention = torch.randint(1, 6, (2, n), generator=g).float() / 100
    for n_keep in budgets(n):
        assert torch.equal(tr.get_selector(name)(tokens, n_keep), REFERENCES[name](tokens, n_keep)), n_keep


def test_holov_identical_crops_share_the_budget_like_the_reference():
    # 16 copies of one crop: every crop weight ties exactly, so which crops get the leftover
    # tokens is decided by how top-k orders ties, as in the official per-sample calls.
    crop = make_tokens(2, 36, seed=12)
    tokens = tr.VisualTokens(features=crop.features.repeat(1, 16, 1), cls_attention=crop.cls_attention.repeat(1, 16))
    for n_keep in (1, 7, 40, 100, 575):
        keep = tr.get_selector("HoloV")(tokens, n_keep)
        assert torch.equal(keep, REFERENCES["HoloV"](tokens, n_keep)), n_keep


def test_divprune_first_pick_is_the_most_isolated_token():
    tokens = make_tokens(1, 40, seed=8)
    outlier = 17
    tokens.features[0, outlier] = -tokens.features[0].sum(dim=0)  # far from every other token
    assert int(tr.get_selector("DivPrune")(tokens, 3)[0, 0]) == outlier


def test_divprune_never_repeats_a_token_where_the_official_code_would():
    # 10 distinct tokens, then exact copies of token 0 (like padded patches): once the distinct
    # ones are taken every distance ties, and the official rule can pick a token a second time.
    g = torch.Generator().manual_seed(9)
    distinct = torch.randn(10, 64, generator=g)
    features = torch.cat([distinct, distinct[:1].expand(30, 64)])[None]
    tokens = tr.VisualTokens(features=features)
    official_style = divprune_reference(features, 16)[0].tolist()
    ours = tr.get_selector("DivPrune")(tokens, 16)[0].tolist()
    assert len(set(official_style)) < 16, "the restatement of the official rule should repeat here"
    first_repeat = next(i for i, p in enumerate(official_style) if p in official_style[:i])
    assert ours[:first_repeat] == official_style[:first_repeat]
    assert len(set(ours)) == 16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", SELECTORS)
def test_half_precision_inputs_match_the_reference_in_that_dtype(name, dtype):
    tokens = make_tokens(2, 576, seed=10, dtype=dtype)
    for n_keep in (1, 64, 575):
        keep = tr.get_selector(name)(tokens, n_keep)
        assert keep.shape == (2, n_keep)
        assert torch.equal(keep, REFERENCES[name](tokens, n_keep))


def test_unknown_selector_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown selector 'NoSuchMethod'.*DivPrune, FastV, FlowCut, HoloV"):
        tr.get_selector("NoSuchMethod")


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("bad", [0, -3, 38, 2.0, "8", True, None])
def test_budget_outside_1_to_n_is_rejected(name, bad):
    tokens = make_tokens(1, 37, seed=0)
    with pytest.raises(ValueError, match=r"n_keep must be an integer in 1\.\.37"):
        tr.get_selector(name)(tokens, bad)


def test_shape_mismatches_are_rejected():
    features = torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match=r"features must be \[B, N, D\]"):
        tr.VisualTokens(features=features[0])
    with pytest.raises(ValueError, match=r"raw_features must be \[B, N, C\]"):
        tr.VisualTokens(features=features, raw_features=torch.randn(2, 9, 4))
    with pytest.raises(ValueError, match=r"raw_features must be \[B, N, C\]"):
        tr.VisualTokens(features=features, raw_features=torch.randn(1, 10, 4))
    with pytest.raises(ValueError, match=r"cls_attention must be \[B, N\]"):
        tr.VisualTokens(features=features, cls_attention=torch.rand(2, 11))
    with pytest.raises(ValueError, match=r"cls_attention must be \[B, N\]"):
        tr.VisualTokens(features=features, cls_attention=torch.rand(2, 10, 1))


@pytest.mark.parametrize(
    "name, given, missing",
    [
        ("HoloV", {}, "cls_attention"),
        ("VisPruner", {"cls_attention": torch.rand(1, 20)}, "raw_features"),
        ("VisPruner", {"raw_features": torch.randn(1, 20, 4)}, "cls_attention"),
    ],
)
def test_missing_inputs_are_named(name, given, missing):
    tokens = tr.VisualTokens(features=torch.randn(1, 20, 8), **given)
    with pytest.raises(ValueError, match=f"{name} needs VisualTokens.{missing}"):
        tr.get_selector(name)(tokens, 4)


def test_divprune_needs_only_the_projected_features():
    keep = tr.get_selector("DivPrune")(tr.VisualTokens(features=torch.randn(2, 20, 8)), 4)
    assert keep.shape == (2, 4)


def test_selector_rejects_anything_but_visual_tokens():
    with pytest.raises(TypeError, match="expects a tokenreduction.VisualTokens"):
        tr.get_selector("HoloV")(torch.randn(1, 20, 8), 4)
