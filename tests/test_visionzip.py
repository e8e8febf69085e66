"""VisionZip: the split, the vectorized functions against the loop restatement, the vision tower's keys."""
from __future__ import annotations

import pytest
import torch

import tokenreduction as tr
from tokenreduction import visionzip as vz
from tokenreduction.reference import visionzip_reference

N_TOKENS = 576
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BUDGETS = [64, 128, 192, 2, 7, 33, 250]


@pytest.fixture
def selector():
    """The registered VisionZip selector (a built-in: found by the registry's discovery)."""
    return tr.get_selector("VisionZip")


def random_tokens(batch_size: int, dtype: torch.dtype, seed: int, ties: bool = False, n_tokens: int = N_TOKENS):
    """VisualTokens with everything VisionZip reads. With ``ties``: attention with many equal values
    and keys from {-1, 0, 1}, so that similarities tie and the first-maximum rule matters."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch_size, 4, n_tokens, generator=gen) * 3
    if ties:
        logits = logits.round()
    attention = logits.softmax(-1).to(dtype).mean(dim=1).float()
    raw = torch.randn(batch_size, n_tokens, 24, generator=gen).to(dtype)
    keys = torch.randn(batch_size, n_tokens, 8, generator=gen)
    if ties:
        keys = keys.round().clamp(-1, 1)
        keys[keys.abs().sum(-1) == 0] = 1.0  # no zero key (its cosine is undefined)
    cls = torch.randn(batch_size, 24, generator=gen).to(dtype)
    return tr.VisualTokens(
        features=raw, raw_features=raw, cls_attention=attention, keys=keys.to(dtype), cls_raw_feature=cls
    )


def reduce_and_reference(tokens: tr.VisualTokens, n_vis: int):
    reduced = vz.visionzip_reduce(tokens, n_vis)
    n_dominant, n_contextual = vz.visionzip_split(n_vis)
    expected = visionzip_reference(
        tokens.raw_features, tokens.cls_attention, tokens.keys, n_dominant - 1, n_contextual, tokens.cls_raw_feature
    )
    return reduced, expected


def assert_same(reduced: vz.VisionZipReduction, expected) -> None:
    dominant, sequence, groups, sizes = expected
    assert torch.equal(reduced.dominant, dominant)
    assert reduced.raw_sequence.dtype == sequence.dtype
    assert torch.equal(reduced.raw_sequence, sequence)
    assert torch.equal(reduced.groups, groups)
    assert torch.equal(reduced.sizes, sizes)


# --- the split ------------------------------------------------------------------------------------


def test_split_of_the_official_budgets():
    assert vz.visionzip_split(64) == (54, 10)
    assert vz.visionzip_split(128) == (108, 20)
    assert vz.visionzip_split(192) == (162, 30)


def test_split_of_other_budgets_keeps_the_ratio():
    assert vz.visionzip_split(1) == (1, 0)
    assert vz.visionzip_split(2) == (1, 1)
    for n_vis in range(2, N_TOKENS + 1):
        dominant, contextual = vz.visionzip_split(n_vis)
        assert dominant + contextual == n_vis
        assert dominant >= 1 and contextual >= 1
        if 1 < contextual < n_vis - 1:
            assert abs(contextual - n_vis * 10 / 64) <= 0.5


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "64"])
def test_split_rejects_non_budgets(bad):
    with pytest.raises(ValueError, match="n_vis must be a positive integer"):
        vz.visionzip_split(bad)


# --- vectorized == restatement --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_vis", BUDGETS)
def test_reduce_equals_the_restatement(dtype, n_vis):
    reduced, expected = reduce_and_reference(random_tokens(3, dtype, seed=n_vis), n_vis)
    assert_same(reduced, expected)
    n_dominant, n_contextual = vz.visionzip_split(n_vis)
    assert reduced.raw_sequence.shape == (3, n_vis, 24)
    assert reduced.dominant.shape == (3, n_dominant - 1)
    assert reduced.contextual.shape == (3, n_contextual, 24)
    assert reduced.remaining.shape == reduced.groups.shape == (3, N_TOKENS - n_dominant + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_vis", [64, 192, 33])
def test_reduce_equals_the_restatement_with_ties(dtype, n_vis):
    tokens = random_tokens(2, dtype, seed=100 + n_vis, ties=True)
    assert_same(*reduce_and_reference(tokens, n_vis))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identical_keys_all_join_the_first_target(dtype):
    """All similarities tie: every remaining token joins target 0. 64 tokens leave 523 remaining,
    513 of them joining one group, a count bf16 holds as 512 (the official divisor's rounding)."""
    tokens = random_tokens(2, dtype, seed=7)
    tokens.keys = torch.ones_like(tokens.keys)
    reduced, expected = reduce_and_reference(tokens, 64)
    assert_same(reduced, expected)
    n_remaining = N_TOKENS - 53
    assert reduced.sizes[:, 0].tolist() == [n_remaining - 9] * 2
    assert reduced.sizes[:, 1:].eq(1).all()
    assert bool((reduced.contextual[:, 1:] == tokens.raw_features.gather(
        1, reduced.targets[:, 1:, None].expand(-1, -1, 24))).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_batch_equals_its_samples_one_by_one(dtype):
    tokens = random_tokens(3, dtype, seed=3)
    batched = vz.visionzip_reduce(tokens, 128)
    for b in range(3):
        single = vz.visionzip_reduce(
            tr.VisualTokens(
                features=tokens.features[b : b + 1],
                raw_features=tokens.raw_features[b : b + 1],
                cls_attention=tokens.cls_attention[b : b + 1],
                keys=tokens.keys[b : b + 1],
                cls_raw_feature=tokens.cls_raw_feature[b : b + 1],
            ),
            128,
        )
        for field in ("dominant", "raw_sequence", "groups", "sizes", "targets", "remaining"):
            assert torch.equal(getattr(single, field)[0], getattr(batched, field)[b]), field


def test_contextual_tokens_by_hand():
    """8 remaining tokens, 2 contextual: targets at positions 0 and 4; each other token joins the
    target whose key points its way; a contextual token is target + mean of its joiners."""
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[[0, 0, 1, 0, 1, 1, 1, 0]][None]
    features = torch.arange(8.0)[None, :, None] * torch.tensor([1.0, 10.0])
    remaining = torch.arange(8)[None]
    out = vz.visionzip_contextual(keys, features, remaining, 2)
    assert out.targets.tolist() == [[0, 4]]
    assert out.groups.tolist() == [[0, 0, 1, 0, 1, 1, 1, 0]]
    assert out.sizes.tolist() == [[4, 4]]
    # group 0: target 0 + mean(1, 3, 7); group 1: target 4 + mean(2, 5, 6)
    assert torch.allclose(out.tokens[0, :, 0], torch.tensor([11 / 3, 4 + 13 / 3]))
    # A group nobody joins keeps its target's feature (the official divisor is at least 1).
    lonely = vz.visionzip_contextual(torch.ones(1, 8, 2), features, remaining, 2)
    assert lonely.sizes.tolist() == [[7, 1]]
    assert torch.equal(lonely.tokens[0, 1], features[0, 4])


def test_remaining_and_targets_are_consistent():
    reduced = vz.visionzip_reduce(random_tokens(2, torch.float32, seed=11), 100)
    for b in range(2):
        assert sorted(reduced.dominant[b].tolist() + reduced.remaining[b].tolist()) == list(range(N_TOKENS))
        assert reduced.remaining[b].diff().gt(0).all() and reduced.dominant[b].diff().gt(0).all()
        # targets are evenly spaced among the remaining tokens and sit in their own groups
        positions = [reduced.remaining[b].tolist().index(t) for t in reduced.targets[b].tolist()]
        step = reduced.remaining.shape[1] // reduced.targets.shape[1]
        assert positions == list(range(0, step * len(positions), step))
        assert reduced.groups[b, positions].tolist() == list(range(len(positions)))
        assert int(reduced.sizes[b].sum()) == reduced.remaining.shape[1]


def test_order_fed_to_the_llm():
    tokens = random_tokens(1, torch.float32, seed=5)
    reduced = vz.visionzip_reduce(tokens, 64)
    sequence = reduced.raw_sequence[0]
    assert torch.equal(sequence[0], tokens.cls_raw_feature[0])
    assert torch.equal(sequence[1:54], tokens.raw_features[0, reduced.dominant[0]])
    assert torch.equal(sequence[54:], reduced.contextual[0])


def test_without_the_cls_token():
    tokens = random_tokens(2, torch.float16, seed=9)
    tokens.cls_raw_feature = None
    reduced = vz.visionzip_reduce(tokens, 64, keep_cls=False)
    assert reduced.cls is None and reduced.dominant.shape == (2, 54) and reduced.raw_sequence.shape == (2, 64, 24)
    expected = visionzip_reference(tokens.raw_features, tokens.cls_attention, tokens.keys, 54, 10)
    assert_same(reduced, expected)
    with pytest.raises(ValueError, match="VisionZip needs VisualTokens.cls_raw_feature"):
        vz.visionzip_reduce(tokens, 64)


def test_a_budget_of_one_keeps_only_the_cls_token():
    tokens = random_tokens(2, torch.float32, seed=1)
    reduced = vz.visionzip_reduce(tokens, 1)
    assert torch.equal(reduced.raw_sequence[:, 0], tokens.cls_raw_feature)
    assert reduced.raw_sequence.shape == (2, 1, 24) and reduced.groups.eq(-1).all()


def test_inputs_are_checked():
    tokens = random_tokens(1, torch.float32, seed=2, n_tokens=20)
    with pytest.raises(ValueError, match="too few"):
        vz.visionzip_reduce(tokens, 22)  # 18 dominant patches + 3 contextual > 20 patches
    with pytest.raises(ValueError, match="VisionZip needs VisualTokens.keys"):
        vz.visionzip_reduce(tr.VisualTokens(features=tokens.features, raw_features=tokens.raw_features,
                                            cls_attention=tokens.cls_attention), 8, keep_cls=False)
    with pytest.raises(ValueError, match="keys must be"):
        tr.VisualTokens(features=tokens.features, keys=torch.zeros(1, 19, 8))
    with pytest.raises(ValueError, match="cls_raw_feature must be"):
        tr.VisualTokens(features=tokens.features, raw_features=tokens.raw_features, cls_raw_feature=torch.zeros(1, 23))
    with pytest.raises(ValueError, match="n_contextual"):
        vz.visionzip_contextual(tokens.keys, tokens.raw_features, torch.arange(3)[None], 4)


# --- the selector ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ties", [False, True])
def test_selector_keeps_the_top_cls_attention_in_patch_order(selector, dtype, ties):
    tokens = random_tokens(3, dtype, seed=21, ties=ties)
    assert torch.equal(selector(tokens, 576), torch.arange(576).expand(3, -1))
    for n_keep in (1, 32, 53, 96, 161, 575):
        keep = selector(tokens, n_keep)
        expected = visionzip_reference(tokens.raw_features, tokens.cls_attention, tokens.keys, n_keep, 1)[0]
        assert torch.equal(keep, expected), n_keep
        assert keep.diff(dim=1).gt(0).all()
        # every kept token has at least the attention of every dropped one
        kept = torch.zeros_like(tokens.cls_attention, dtype=torch.bool).scatter_(1, keep, True)
        kept_min = tokens.cls_attention.gather(1, keep).min(dim=1).values
        assert bool((tokens.cls_attention.masked_fill(kept, -1).max(dim=1).values <= kept_min).all())


def test_selector_is_the_dominant_part_of_the_plain_method(selector):
    tokens = random_tokens(2, torch.float16, seed=4)
    assert torch.equal(selector(tokens, 161), vz.visionzip_reduce(tokens, 192).dominant)
    with pytest.raises(ValueError, match="VisionZip needs VisualTokens.cls_attention"):
        selector(tr.VisualTokens(features=tokens.features), 8)


# --- the vision tower -----------------------------------------------------------------------------


def test_vision_tower_keys_are_clips_own(small_model):
    from llava_patches.vision import _layer_indices, encode_visual_tokens, encode_with_cls_attention

    model = small_model.model
    tower = model.get_model().get_vision_tower()
    images = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(tower.dtype)
    clip = tower.vision_tower.vision_model
    layers = clip.encoder.layers
    hidden_index, attention_index = _layer_indices(tower.select_layer, len(layers))

    # What CLIP itself computes: the attention layer's input, its layer norm, its key projection.
    with torch.no_grad():
        states = tower.vision_tower(images, output_hidden_states=True).hidden_states
        attention = layers[attention_index].self_attn
        projected = attention.k_proj(layers[attention_index].layer_norm1(states[attention_index]))
        per_head = attention._shape(projected, -1, images.shape[0])  # [B, H, L, d], CLIP's own split
        expected_keys = per_head.mean(dim=1)[:, 1:]

    plain = encode_with_cls_attention(tower, images)
    assert len(plain) == 2
    features, cls_attention, keys, cls = encode_with_cls_attention(tower, images, with_keys=True, with_cls=True)
    assert torch.equal(features, plain[0]) and torch.equal(cls_attention, plain[1])
    assert keys.shape == (2, 576, attention.head_dim)
    assert torch.equal(keys, expected_keys)
    assert torch.equal(cls, states[hidden_index][:, 0])
    assert not attention.k_proj._forward_hooks  # the hook is gone afterwards

    tokens = encode_visual_tokens(model, images, with_keys=True, with_cls=True)
    assert torch.equal(tokens.keys, expected_keys) and torch.equal(tokens.cls_raw_feature, cls)
    default = encode_visual_tokens(model, images)
    assert default.keys is None and default.cls_raw_feature is None
    assert torch.equal(default.features, tokens.features)

    # The whole plain method runs on the tower's outputs; the caller projects the raw sequence.
    reduced = vz.visionzip_reduce(tokens, 64)
    projected_sequence = model.get_model().mm_projector(reduced.raw_sequence)
    assert projected_sequence.shape == (2, 64, tokens.features.shape[-1])
    assert torch.equal(projected_sequence[:, 1:54], tokens.features.gather(
        1, reduced.dominant[..., None].expand(-1, -1, tokens.features.shape[-1])))
