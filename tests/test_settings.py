"""RESTORE's components as settings: hand-computed values, validation, run names, every combination end to
end, and a restatement of the prefill for points away from the paper's defaults."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX

import restore
import tokenreduction as tr
from restore.attention import calibrated_decode_masks, calibrated_prefill_masks, distance_bias
from restore.merge import anchor_merge, group_positions, uniform_anchors
from restore.reduce import reduce_visual_tokens
from restore.settings import resolve_settings, run_tag
from tests.test_merge import _tokens, reference_anchor_merge
from tests.test_restore_reference import _llama_logits, _vision_like_official


# ---- pure functions on tiny tensors --------------------------------------------------------------

def test_uniform_anchors_are_evenly_spaced():
    assert uniform_anchors(1, 10, 3).tolist() == [[0, 3, 6]]
    assert uniform_anchors(2, 7, 2).tolist() == [[0, 3], [0, 3]]
    assert uniform_anchors(1, 5, 5).tolist() == [[0, 1, 2, 3, 4]]
    assert uniform_anchors(1, 11, 4).tolist() == [[0, 2, 4, 6]]  # step 11 // 4 = 2


def test_uniform_anchor_merge_by_hand():
    # anchors 0 and 2 (step 4 // 2); token 1 points like anchor 2, token 3 like anchor 0
    x = torch.tensor([[[1.0, 0.0], [0.1, 1.0], [0.0, 2.0], [3.0, 0.2]]])
    out = anchor_merge(x, 2, anchor_rule="uniform")
    assert out.anchors.tolist() == [[0, 2]]
    assert out.group_of.tolist() == [[0, 1, 1, 0]]
    assert out.sizes.tolist() == [[2.0, 2.0]]
    torch.testing.assert_close(out.features, torch.tensor([[[2.0, 0.1], [0.05, 1.5]]]))
    with pytest.raises(ValueError, match="anchor_rule"):
        anchor_merge(x, 2, anchor_rule="random")


def test_merged_position_rules_by_hand():
    positions = torch.tensor([[3, 8, 10, 20, 21]])
    group_of = torch.tensor([[0, 1, 0, 0, 1]])  # group 0: 3, 10, 20; group 1: 8, 21
    assert group_positions(positions, group_of, 2, "median").tolist() == [[10, 8]]
    assert group_positions(positions, group_of, 2, "first").tolist() == [[3, 8]]
    assert group_positions(positions, group_of, 2, "last").tolist() == [[20, 21]]
    assert group_positions(positions, group_of, 2, "mean").tolist() == [[11, 15]]  # 11, 14.5 rounded up
    with pytest.raises(ValueError, match="merged position"):
        group_positions(positions, group_of, 2, "mode")


def test_size_only_calibration_and_constant_c_by_hand():
    pos = torch.tensor([[0, 1, 5]])
    # head_dim 2: one frequency, D(d) = cos(d)
    c3 = distance_bias(pos, torch.float32, head_dim=2, c=3.0)
    assert c3[0, 2, 0].item() == pytest.approx(math.log(3 - math.cos(5)), rel=1e-6)
    sizes = torch.tensor([[1.0, 4.0, 1.0]])
    visual = torch.tensor([[False, True, False]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    first, later = calibrated_prefill_masks(pos, sizes, visual, valid, num_patches=8, n_vis=2, dtype=torch.float32,
                                            head_dim=2, use_distance=False)
    low = torch.finfo(torch.float32).min
    expected_later = torch.tensor([[0.0, low, low], [0.0, math.log(4), low], [0.0, math.log(4), 0.0]])
    torch.testing.assert_close(later[0, 0], expected_later)
    assert first[0, 0, 2, 1].item() == pytest.approx(math.log(8 / 2))  # uniform size N / n_vis in layer 0
    # without merging every layer sees size 1
    same, _ = calibrated_prefill_masks(pos, sizes, visual, valid, num_patches=8, n_vis=2, dtype=torch.float32,
                                       head_dim=2, use_distance=False, uniform_first_layer=False)
    torch.testing.assert_close(same, later)
    dec_first, dec_later = calibrated_decode_masks(sizes, visual, torch.ones(1, 4, dtype=torch.bool), num_patches=8,
                                                   n_vis=2, dtype=torch.float32, uniform_first_layer=False)
    torch.testing.assert_close(dec_first, dec_later)
    assert dec_later[0, 0, 0].tolist() == pytest.approx([0.0, math.log(4), 0.0, 0.0])


def test_gamma_zero_merges_every_token():
    tokens = _tokens(1)
    out = reduce_visual_tokens(tokens, "HoloV", 64, restore=True, prune_ratio=0.0)
    assert out.features.shape[1] == 64 and torch.equal(out.sizes.sum(dim=1), torch.full((2,), 576.0))
    assert (out.sizes >= 1).all() and (out.positions.diff(dim=1) > 0).all()
    groups = anchor_merge(tokens.features, 64)
    for b in range(2):
        medians = group_positions(torch.arange(576).expand(2, 576), groups.group_of, 64)[b]
        assert out.positions[b].tolist() == sorted(medians.tolist())


def test_gamma_one_is_prune_only_in_position_order():
    tokens = _tokens(2)
    out = reduce_visual_tokens(tokens, "DivPrune", 64, restore=True, prune_ratio=1.0)
    keep = tr.get_selector("DivPrune")(tokens, 64)
    assert torch.equal(out.positions, keep.sort(dim=-1).values)
    assert torch.all(out.sizes == 1)
    plain = reduce_visual_tokens(tokens, "DivPrune", 64, restore=False)
    assert torch.equal(plain.positions, keep)  # the baseline keeps DivPrune's own order


@pytest.mark.parametrize("gamma,n_keep", [(0.25, 16), (0.75, 48), (0.5, 32), (0.9, 57)])
def test_gamma_sets_the_kept_share(gamma, n_keep):
    tokens = _tokens(3)
    s = resolve_settings("HoloV", 64, True, 576, prune_ratio=gamma)
    assert (s.n_keep, s.n_merged) == (n_keep, 64 - n_keep)
    out = reduce_visual_tokens(tokens, s)
    assert int((out.sizes == 1).sum(dim=1).min()) >= n_keep


def test_mean_positions_may_share_an_id_and_stay_ordered():
    tokens = _tokens(4)
    out = reduce_visual_tokens(tokens, "VisPruner", 64, restore=True, merged_position="mean")
    assert (out.positions.diff(dim=1) >= 0).all()
    counts = torch.zeros(2, 64).scatter_add_(1, out.source, torch.ones(2, 576))
    assert torch.equal(counts, out.sizes)


# ---- validation and names ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (dict(anchors="none", prune_ratio=0.5), "anchors='none' merges nothing"),
    (dict(prune_ratio=1.5), r"prune_ratio \(gamma\) must be a number in \[0, 1\]"),
    (dict(calibration_c=1.0), "calibration_c must be a finite number above 1"),
    (dict(calibration="distance"), "calibration must be one of"),
    (dict(positions="original"), "positions must be one of"),
    (dict(merged_position="centre"), "merged_position must be one of"),
    (dict(anchors="kmeans"), "anchors must be one of"),
])
def test_bad_settings_say_what_to_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_settings("HoloV", 64, True, 576, **overrides)


def test_unknown_setting_and_tiny_budget():
    with pytest.raises(TypeError, match="unknown reduction setting"):
        resolve_settings("HoloV", 64, True, 576, gamma=0.5)
    with pytest.raises(ValueError, match="n_vis >= 4"):
        resolve_settings("HoloV", 3, True, 576, prune_ratio=0.25)
    assert resolve_settings("HoloV", 3, True, 576, prune_ratio=0.0).n_keep == 0


def test_defaults_and_run_tags():
    paper = resolve_settings("HoloV", 64, True, 576)
    assert (paper.n_keep, paper.anchors, paper.positions, paper.calibration, paper.calibration_c,
            paper.merged_position) == (32, "distinctive", "retained", "size_distance", 2.0, "median")
    assert run_tag(paper) == "holov-64-restore" and run_tag(None) == "full"
    plain = resolve_settings("HoloV", 64, False, 576)
    assert plain.is_plain_base and plain.in_base_order and not plain.calibrates and run_tag(plain) == "holov-64"
    assert run_tag(resolve_settings("HoloV", 64, True, 576, prune_ratio=0.75)) == "holov-64-restore-g0.75"
    # gamma = 1 and no anchors are one configuration, with one name
    g1 = resolve_settings("HoloV", 64, True, 576, prune_ratio=1.0)
    assert g1 == resolve_settings("HoloV", 64, True, 576, anchors="none") and run_tag(g1) == "holov-64-restore-g1"
    row2 = resolve_settings("HoloV", 64, False, 576, calibration="size_distance")
    assert run_tag(row2) == "holov-64-cal_size_distance"
    odd = resolve_settings("DivPrune", 64, True, 576, anchors="uniform", positions="reindexed", calibration="size",
                           calibration_c=3.0, merged_position="last")
    assert run_tag(odd) == "divprune-64-restore-anchors_uniform-pos_reindexed-cal_size-mpos_last"  # c unused
    assert run_tag(resolve_settings("HoloV", 64, True, 576, calibration_c=1.5)) == "holov-64-restore-c1.5"
    # Table 4 row 4 and Table 19's gamma = 1 are one reduction: one name, whichever way it is asked for
    row4 = resolve_settings("HoloV", 64, False, 576, positions="retained", calibration="size_distance")
    assert row4 == g1 and run_tag(row4) == "holov-64-restore-g1"
    assert run_tag(resolve_settings("HoloV", 64, False, 576, positions="retained")) == "holov-64-pos_retained"
    assert run_tag(resolve_settings("HoloV", 64, True, 576, prune_ratio=1.0, calibration="none",
                                    positions="reindexed")) == "holov-64"
    tags = {run_tag(resolve_settings("HoloV", 64, r, 576, **kw)) for r, kw in _COMBINATIONS}
    assert len(tags) == len({resolve_settings("HoloV", 64, r, 576, **kw) for r, kw in _COMBINATIONS})


# ---- the model: every combination, and a restatement -----------------------------------------------

_COMBINATIONS = [(False, {})] + [
    (True, dict(anchors=a, positions=p, calibration=c, prune_ratio=g))
    for a, p, c, g in itertools.product(["distinctive", "uniform", "none"], ["retained", "reindexed"],
                                        ["size_distance", "size", "none"], [0.5, 0.0])
    if not (a == "none" and g < 1)
] + [(True, dict(anchors="none", positions=p, calibration=c, prune_ratio=1.0))
     for p, c in itertools.product(["retained", "reindexed"], ["size_distance", "size", "none"])
     ] + [(True, dict(merged_position=m)) for m in ["first", "mean", "last"]]


@pytest.fixture
def prompt(small_model, make_inputs, synthetic_image):
    tok, _, proc = small_model
    return make_inputs(tok, proc, "What is on the left?", synthetic_image(5, (500, 280)),
                       model_config=small_model.model.config)


def test_every_combination_runs_with_n_vis_visual_tokens(model, prompt):
    ids, images = prompt
    n_vis = 48
    for use_restore, kw in _COMBINATIONS:
        restore.apply(model, base="HoloV", n_vis=n_vis, restore=use_restore, **kw)
        settings = restore.settings_of(model)
        with torch.inference_mode():
            logits = model(input_ids=ids, images=images).logits
            layout = model._restore_ctx.layout
            tokens = model.generate(ids, images=images, max_new_tokens=2, do_sample=False, num_beams=1,
                                    pad_token_id=0)
        assert int(layout.is_visual.sum()) == n_vis, (use_restore, kw)
        assert logits.shape[1] == ids.shape[1] - 1 + n_vis and torch.isfinite(logits).all()
        assert tokens.shape[0] == 1
        at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
        visual_positions = layout.positions[0, layout.is_visual[0]]
        if settings.retains_positions:
            assert int(layout.positions[0, -1]) == ids.shape[1] - 2 + 576  # text keeps its full-sequence ids
            assert (visual_positions.diff() >= 0).all() and int(visual_positions.max()) < at + 576
        else:
            assert torch.equal(layout.positions[0], torch.arange(layout.length))


def _restated_tokens(model, images, settings):
    """The reduced tokens (position, size, feature), restated with loops for one image."""
    raw, features, attention = _vision_like_official(model, images)
    n_keep = settings.n_keep
    keep = tr.get_selector(settings.base)(tr.VisualTokens(features, raw, attention), n_keep)[0].tolist() if n_keep else []
    tokens = [(p, 1.0, features[0, p]) for p in keep]
    if settings.merges:
        rest = [i for i in range(features.shape[1]) if i not in keep]
        k = settings.n_vis - n_keep
        x = features[0, rest].double()
        if settings.anchors == "distinctive":
            anchors, groups = reference_anchor_merge(x, k)
        else:
            unit = x / x.norm(dim=-1, keepdim=True)
            sim = unit @ unit.T
            step = max(1, len(rest) // k)
            anchors = list(range(0, len(rest), step))[:k]
            groups = {a: [a] for a in anchors}
            for i in range(len(rest)):
                if i not in groups:
                    groups[max(anchors, key=lambda a: (sim[i, a].item(), -a))].append(i)
        for a in anchors:
            members = sorted(rest[m] for m in groups[a])
            rule = settings.merged_position
            if rule == "median":
                pos = members[(len(members) - 1) // 2]
            elif rule == "first":
                pos = members[0]
            elif rule == "last":
                pos = members[-1]
            else:
                pos = math.floor(sum(members) / len(members) + 0.5)
            tokens.append((pos, float(len(members)), features[0, members].mean(dim=0)))
    if not settings.in_base_order:
        tokens.sort(key=lambda t: t[0])
    return tokens


_RESTATED = [
    dict(anchors="uniform", positions="reindexed", calibration="size", merged_position="mean", prune_ratio=0.25),
    dict(positions="retained", calibration="size_distance", calibration_c=3.0, merged_position="first",
         prune_ratio=0.75),
    dict(anchors="none", prune_ratio=1.0),  # Table 4 row 4: retained positions and calibration, no merging
    dict(anchors="none", prune_ratio=1.0, positions="reindexed"),  # Table 4 row 2 (re-indexed + calibrated)
    dict(prune_ratio=0.0, calibration="none", merged_position="last"),  # merge only, uncalibrated
    dict(calibration="none", positions="reindexed"),  # Table 4 row 5: merging alone
]


def _expected(base: str, n_vis: int, overrides: dict) -> SimpleNamespace:
    """What restore=True with ``overrides`` means, restated from docs/settings.md (not from the code)."""
    anchors = overrides.get("anchors", "distinctive")
    gamma = 1.0 if anchors == "none" else overrides.get("prune_ratio", 0.5)
    n_keep = n_vis if anchors == "none" else int(n_vis * gamma)
    retained = overrides.get("positions", "retained") == "retained"
    calibration = overrides.get("calibration", "size_distance")
    merges = n_keep < n_vis
    return SimpleNamespace(base=base, n_vis=n_vis, n_keep=n_keep, merges=merges, anchors=anchors,
                           merged_position=overrides.get("merged_position", "median"), retains_positions=retained,
                           in_base_order=not merges and not retained, calibrates=calibration != "none",
                           uses_distance=calibration == "size_distance",
                           calibration_c=overrides.get("calibration_c", 2.0))


@pytest.mark.parametrize("overrides", _RESTATED)
def test_prefill_matches_restatement(model, prompt, overrides):
    ids, images = prompt
    n_vis, N = 40, 576
    settings = _expected("VisPruner", n_vis, overrides)
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    text_before, text_after = ids[0, :at], ids[0, at + 1:]
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2).double() / head_dim))
    with torch.inference_mode():
        tokens = _restated_tokens(model, images, settings)
        embed = model.get_model().embed_tokens
        embeds = torch.cat([embed(text_before), torch.stack([t[2] for t in tokens]), embed(text_after)])
        if settings.retains_positions:
            positions = torch.cat([torch.arange(at), at + torch.tensor([t[0] for t in tokens]),
                                   at + N + torch.arange(len(text_after))])
        else:
            positions = torch.arange(len(embeds))
        sizes = torch.cat([torch.ones(at), torch.tensor([t[1] for t in tokens]), torch.ones(len(text_after))])
        visual = torch.zeros(len(sizes), dtype=torch.bool)
        visual[at:at + n_vis] = True
        first_sizes = torch.where(visual, torch.tensor(N / n_vis), torch.tensor(1.0)) if settings.merges else sizes

        def bias(layer_sizes):
            n = len(positions)
            b = torch.zeros(n, n, dtype=torch.float64)
            if settings.calibrates:
                b = b + torch.log(layer_sizes)[None, :].double()
            if settings.uses_distance:
                d = (positions[:, None] - positions[None, :]).clamp(min=0)
                b = b + torch.log(settings.calibration_c - torch.cos(d.double()[..., None] * inv).mean(-1))
            return b.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).float()

        expected = _llama_logits(model, embeds, positions, lambda i: bias(first_sizes if i == 0 else sizes))
        restore.apply(model, base="VisPruner", n_vis=n_vis, restore=True, **overrides)
        assert restore.settings_of(model) == resolve_settings("VisPruner", n_vis, True, N, **overrides)
        out = model(input_ids=ids, images=images).logits[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_no_calibration_no_merging_reindexed_is_the_plain_base(model, prompt):
    ids, images = prompt
    restore.apply(model, base="HoloV", n_vis=64, restore=False)
    with torch.inference_mode():
        plain = model(input_ids=ids, images=images).logits
    # the defaults of restore=True moved back to the plain point: the same reduction, in HoloV's own order
    restore.apply(model, base="HoloV", n_vis=64, restore=True, prune_ratio=1.0, positions="reindexed",
                  calibration="none")
    assert restore.settings_of(model).is_plain_base
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids, images=images).logits, plain)
    with pytest.raises(ValueError, match="need a base method"):
        restore.apply(model, base=None, calibration="size")


# ---- Table 18: weighted Hausdorff distance ---------------------------------------------------------

def test_weighted_hausdorff_by_hand():
    from restore.analysis.hausdorff import weighted_hausdorff

    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    y = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    # costs (1 - cos) / s with s = (1, 1): rows min 0, 0, 1 - 1/sqrt2 -> max 1 - 1/sqrt2
    assert weighted_hausdorff(x, y, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(1 - 2 ** -0.5, rel=1e-6)
    # a token standing for 4 patches may be 4x farther away
    assert weighted_hausdorff(x, y, torch.tensor([[1.0, 4.0]])).item() == pytest.approx((1 - 2 ** -0.5) / 4, rel=1e-6)
    far = torch.tensor([[[-1.0, 0.0]]])
    assert weighted_hausdorff(x, far, torch.tensor([[1.0]])).item() == pytest.approx(2.0)


def test_hausdorff_table_orders_reductions():
    from restore.analysis.hausdorff import hausdorff_table

    rows = hausdorff_table([_tokens(7)], ["DivPrune", "VisPruner"], 64)
    by = {(r.base, r.reduction): r.mean for r in rows}
    assert len(rows) == 6 and all(r.n_images == 2 for r in rows)
    for base in ("DivPrune", "VisPruner"):
        # merged tokens cover the rest of the image: far below prune only
        assert by[base, "P + M distinctive"] < by[base, "prune only"]
        assert by[base, "P + M uniform"] < by[base, "prune only"]


# ---- one reduction, one name (review findings) --------------------------------------------------------

def test_coordinates_without_effect_do_not_make_another_configuration():
    plain = resolve_settings("VisionZip", 64, False, 576)
    for kw in (dict(merged_position="mean"), dict(calibration_c=3.0), dict(calibration="size", calibration_c=2.5)):
        s = resolve_settings("VisionZip", 64, False, 576, **kw)
        if "calibration" not in kw:
            assert s == plain and s.is_plain_base, kw  # VisionZip keeps its own plain row
        assert s.calibration_c == 2.0 and s.merged_position == "median"
    same = resolve_settings("VisionZip", 64, True, 576, prune_ratio=1.0, positions="reindexed", calibration="none",
                            merged_position="last")
    assert same == plain and run_tag(same) == "visionzip-64"
    tome = resolve_settings("ToMe", 64, False, 576, merged_position="mean")
    assert tome == resolve_settings("ToMe", 64, False, 576) and run_tag(tome) == "tome-64"
    assert resolve_settings("ToMe", 64, False, 576, positions="retained", merged_position="mean").merged_position == "mean"
    with pytest.raises(ValueError, match="merges nothing at prune_ratio=1"):
        resolve_settings("HoloV", 64, False, 576, anchors="uniform")


def test_close_ratios_get_distinct_names():
    a = run_tag(resolve_settings("HoloV", 64, True, 576, prune_ratio=0.2656249))
    b = run_tag(resolve_settings("HoloV", 64, True, 576, prune_ratio=0.2656251))
    assert a == "holov-64-restore-g0.2656249" and b == "holov-64-restore-g0.2656251"


def test_tome_budget_refused_by_apply_on_a_shallow_tower(model):
    with pytest.raises(ValueError, match="ToMe cannot take 576 tokens to 64 in 2 layers"):
        restore.apply(model, base="ToMe", n_vis=64)
    assert not restore.is_applied(model)


def test_run_names_read_back_as_their_configuration():
    """parse_run_tag inverts run_tag over the whole settings space, for every method kind."""
    from restore.settings import ANCHORS, CALIBRATIONS, MERGED_POSITIONS, POSITIONS, parse_run_tag

    seen = 0
    for base, gamma, anchors, positions, calibration, c, mpos, as_restore in itertools.product(
            ["HoloV", "VisionZip", "ToMe"], [None, 0.0, 0.25, 0.75, 1.0], [None, *ANCHORS], [None, *POSITIONS],
            [None, *CALIBRATIONS], [None, 3.5], [None, *MERGED_POSITIONS], [False, True]):
        overrides = dict(prune_ratio=gamma, anchors=anchors, positions=positions, calibration=calibration,
                         calibration_c=c, merged_position=mpos)
        try:
            settings = resolve_settings(base, 32, as_restore, 576, **overrides)
        except ValueError:
            continue
        config = parse_run_tag(run_tag(settings))
        config["base"] = tr.canonical_name(config["base"])  # names are lower case
        assert resolve_settings(num_patches=576, **config) == settings, run_tag(settings)
        seen += 1
    assert seen > 500
    assert parse_run_tag("full") is None and parse_run_tag(" FULL ") is None
    assert parse_run_tag("HoloV-64-Restore-pos_reindexed") == {"base": "HoloV", "n_vis": 64, "restore": True,
                                                               "positions": "reindexed"}
    for bad, message in [("HoloV", "expected 'full'"), ("64", "expected 'full'"), ("HoloV-64-gx", "cannot read"),
                         ("HoloV-64-g0.5-g0.25", "sets prune_ratio twice"), ("HoloV-64-anchor_uniform", "cannot read")]:
        with pytest.raises(ValueError, match=message):
            parse_run_tag(bad)
