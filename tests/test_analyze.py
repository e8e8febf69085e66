"""restore.analyze: attention shares per layer and token maps, on the small checkpoint."""
import json

import numpy as np
import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX

import restore
from restore import analyze
from restore.analysis import attention as att
from restore.analysis.models import BenchModel, prompt_inputs
from restore.analysis.token_map import build_stage_token_maps, build_token_map, draw_token_map

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def bench_model(small_model):
    tok, model, proc = small_model
    try:
        yield BenchModel(tok, model, proc, "small")
    finally:
        restore.remove(model)


@pytest.fixture
def prompt(bench_model, synthetic_image):
    return prompt_inputs(bench_model, synthetic_image(3, (400, 300)), "Is there a red circle?")


def test_row_shares_split_each_row_into_visual_and_other():
    # By hand: keys 1 and 3 are visual.
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.25, 0.25]])
    visual, other = att.row_shares(probs, torch.tensor([False, True, False, True]))
    torch.testing.assert_close(visual, torch.tensor([0.6, 0.25]))
    torch.testing.assert_close(other, torch.tensor([0.4, 0.75]))
    # Rows that do not sum to one (e.g. a slice of the keys): "other" is the mass on the other keys, not 1 - visual.
    weights = torch.rand(3, 7, 7)
    visual_keys = torch.tensor([False, True, True, False, True, False, False])
    visual, other = att.row_shares(weights, visual_keys)
    torch.testing.assert_close(visual, weights[..., [1, 2, 4]].sum(dim=-1))
    torch.testing.assert_close(other, weights[..., [0, 3, 5, 6]].sum(dim=-1))


@pytest.mark.parametrize("use_restore", [False, True])
def test_prefill_probabilities_are_distributions_and_shares_in_unit_interval(bench_model, prompt, use_restore):
    ids, images, sizes = prompt
    restore.apply(bench_model.model, base="HoloV", n_vis=64, restore=use_restore)
    attentions, masks = att.prefill_attentions(bench_model.model, ids, images, sizes)
    is_visual = masks[0]
    assert all(torch.equal(mask, is_visual) for mask in masks)  # a reduction before the LLM: one layout
    # The 64 visual tokens sit, in one block, where the prompt's <image> placeholder was.
    slot = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    expected_visual = torch.zeros(ids.shape[1] - 1 + 64, dtype=torch.bool)
    expected_visual[slot:slot + 64] = True
    assert torch.equal(is_visual, expected_visual)
    assert len(attentions) == bench_model.model.config.num_hidden_layers
    for probs in attentions:
        heads_mean = probs[0].float().mean(dim=0)
        torch.testing.assert_close(heads_mean.sum(dim=-1), torch.ones(heads_mean.shape[0]))
        visual, other = att.row_shares(heads_mean, is_visual)
        torch.testing.assert_close(visual, heads_mean[:, slot:slot + 64].sum(dim=-1))
        assert bool(((visual >= 0) & (visual <= 1 + 1e-6)).all())
        assert float(visual[:slot].abs().max()) == 0.0  # causal: the system prompt sees no image
        assert bool((visual[slot:] > 0).all())  # from the first visual token on, every query sees one
        assert bool((other > 0).all())  # every query sees <s>


def test_stock_visual_mask_matches_the_patched_layout(bench_model, prompt):
    ids, images, sizes = prompt
    model = bench_model.model
    stock = att.sequence_visual_mask(model, ids)
    restore.apply(model, base="VisPruner", n_vis=576)  # everything kept, in patch order
    with torch.inference_mode():
        model(input_ids=ids, images=images, image_sizes=sizes)
    assert torch.equal(att.sequence_visual_mask(model, ids), stock)
    groups = att.query_groups(stock)
    assert int(groups["text"].sum()) == stock.shape[0] - 1 - int(stock.nonzero().max())


def test_analyse_configs_compares_three_settings_and_leaves_the_model_stock(bench_model, prompt):
    results = att.analyse_configs(bench_model.model, *prompt, base="HoloV", n_vis=64)
    assert [r.label for r in results] == ["full", "HoloV", "HoloV+RESTORE"]
    assert [r.n_visual for r in results] == [576, 64, 64]
    n_layers = bench_model.model.config.num_hidden_layers
    for r in results:
        for group in att.QUERY_GROUPS:
            assert len(r.shares[group]) == n_layers and all(0 <= v <= 1 for v in r.shares[group])
    assert results[1].shares != results[2].shares  # RESTORE's bias changes the attention
    assert not restore.is_applied(bench_model.model)


def test_token_map_with_restore_covers_every_patch_once(bench_model, prompt, tmp_path):
    _, images, _ = prompt
    token_map = build_token_map(bench_model, images, "HoloV", 64, restore=True)
    assert token_map.source.shape == (576,) and token_map.grid == 24
    assert token_map.source.min() >= 0 and token_map.source.max() < 64  # every patch in exactly one token
    sizes = token_map.group_sizes()
    assert sizes.sum() == 576 and (sizes >= 1).all()
    assert len(token_map.kept) == 32 and (sizes[token_map.source[token_map.kept]] == 1).all()
    # The model's view: LLaVA pads the 400 x 300 image to a square with the CLIP mean colour.
    mean = np.round(np.array(bench_model.image_processor.image_mean) * 255)
    assert token_map.image.shape == (336, 336, 3)
    assert np.abs(token_map.image[0, 0].astype(float) - mean).max() <= 1
    path = tmp_path / "map.png"
    draw_token_map(token_map, path)
    assert path.read_bytes()[:8] == PNG


def test_token_map_without_restore_keeps_only_the_selected(bench_model, prompt):
    _, images, _ = prompt
    token_map = build_token_map(bench_model, images, "DivPrune", 48, restore=False)
    represented = np.flatnonzero(token_map.source >= 0)
    assert sorted(represented) == sorted(token_map.kept.tolist()) and len(represented) == 48
    assert (token_map.group_sizes() == 1).all()


def test_attention_of_an_in_llm_method_follows_each_layers_tokens(bench_model, prompt):
    from tokenreduction.pdrop import PDrop

    ids, images, sizes = prompt
    restore.apply(bench_model.model, base="PDrop", n_vis=64, restore=True)
    attentions, masks = att.prefill_attentions(bench_model.model, ids, images, sizes)
    # the 4-layer checkpoint: all 576 tokens in layer 0, then PDrop's three budgets
    assert [int(m.sum()) for m in masks] == [576, *PDrop().budgets(64, 576)]
    for probs, mask in zip(attentions, masks):
        assert probs.shape[-1] == probs.shape[-2] == mask.shape[0]
        torch.testing.assert_close(probs[0].float().mean(dim=0).sum(dim=-1), torch.ones(mask.shape[0]))
    shares = att.layer_shares(attentions, masks)
    assert all(0 < v <= 1 for v in shares["text"])


@pytest.mark.parametrize("use_restore", [False, True])
def test_stage_token_maps_show_what_survived_each_cut(bench_model, prompt, use_restore):
    from tokenreduction.pdrop import PDrop

    ids, images, _ = prompt
    maps = build_stage_token_maps(bench_model, ids, images, "PDrop", 64, use_restore)
    budgets = PDrop().budgets(64, 576)
    assert [m.n_vis for m in maps] == budgets
    previous = set(range(576))
    for token_map, budget in zip(maps, budgets):
        represented = set(np.flatnonzero(token_map.source >= 0).tolist())
        if use_restore:  # nothing is dropped: every patch is in one of the stage's tokens
            assert represented == set(range(576)) and token_map.group_sizes().sum() == 576
        else:  # plain PDrop keeps a subset of the previous stage's tokens
            assert len(represented) == budget and represented <= previous
            assert sorted(token_map.kept.tolist()) == sorted(represented)
        previous = represented
    assert not restore.is_applied(bench_model.model)


def test_cli_writes_outputs(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert analyze.main(["tokens", "--model-path", str(small_checkpoint), "--seed", "2", "--base", "VisPruner",
                         "--n-vis", "32", "--restore", "--out", str(out)]) == 0
    assert (out / "tokens_seed2_VisPruner_restore_32.png").read_bytes()[:8] == PNG
    assert "576 of 576 patches" in capsys.readouterr().out
    assert analyze.main(["tokens", "--model-path", str(small_checkpoint), "--base", "FastV", "--n-vis", "32",
                         "--out", str(out)]) == 0
    assert (out / "tokens_seed0_FastV_32_stage1.png").read_bytes()[:8] == PNG
    assert "32 of 576 patches" in capsys.readouterr().out

    assert analyze.main(["attention", "--model-path", str(small_checkpoint), "--n-vis", "32", "--out", str(out)]) == 0
    payload = json.loads((out / "attention_seed0_HoloV_32.json").read_text())
    assert [c["label"] for c in payload["configs"]] == ["full", "HoloV", "HoloV+RESTORE"]
    assert (out / "attention_seed0_HoloV_32.png").read_bytes()[:8] == PNG
    assert analyze.main(["tokens", "--model-path", str(small_checkpoint), "--base", "nope", "--out", str(out)]) == 2
