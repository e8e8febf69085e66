"""VisionZip and ToMe through restore.apply: the plain rows feed the LLM exactly what the methods compute,
and RESTORE's settings work on them (on a small checkpoint with a 6-layer CLIP, so that ToMe can reach 64)."""
import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX

import restore
import tokenreduction as tr
from llava_patches.loading import load_model
from llava_patches.tome import encode_with_tome
from llava_patches.vision import encode_visual_tokens
from restore.small_checkpoint import build_small_checkpoint
from tokenreduction.visionzip import visionzip_reduce


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    path = build_small_checkpoint(tmp_path_factory.mktemp("deep") / "llava-v1.5-small-deep", seed=0, vision_layers=6)
    tokenizer, model, processor, _ = load_model(path, device="cpu", dtype="float32")
    try:
        yield tokenizer, model, processor
    finally:
        restore.remove(model)


@pytest.fixture
def prompt(deep, make_inputs, synthetic_image):
    tok, model, proc = deep
    return make_inputs(tok, proc, "What is in the image?", synthetic_image(2, (480, 320)), model_config=model.config)


def _logits_on(model, ids, visual):
    """Stock LLaVA's LLM on the prompt with ``visual`` [n, D] where the image placeholder is."""
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    embed = model.get_model().embed_tokens
    embeds = torch.cat([embed(ids[0, :at]), visual, embed(ids[0, at + 1:])]).unsqueeze(0)
    restore.remove(model)
    return model(inputs_embeds=embeds).logits


def test_registry_says_where_methods_act():
    assert tr.acts_in("ToMe") == "vision_encoder" and tr.acts_in("visionzip") == "before_llm"
    assert tr.acts_in("HoloV") == "before_llm" and "ToMe" in tr.available_methods()
    with pytest.raises(ValueError, match="acts in the vision encoder and has no selector"):
        tr.get_selector("ToMe")
    assert tr.method_needs("VisionZip") == () and set(tr.method_needs("VisionZip", plain=True)) == {"keys", "cls_raw_feature"}


@pytest.mark.parametrize("n_vis", [64, 128, 37])
def test_plain_visionzip_feeds_its_cls_dominant_and_contextual_tokens(deep, prompt, n_vis):
    _, model, _ = deep
    ids, images = prompt
    with torch.inference_mode():
        tokens = encode_visual_tokens(model, images, with_keys=True, with_cls=True)
        expected_visual = model.get_model().mm_projector(visionzip_reduce(tokens, n_vis).raw_sequence)[0]
        expected = _logits_on(model, ids, expected_visual)
        restore.apply(model, base="VisionZip", n_vis=n_vis)
        out = model(input_ids=ids, images=images).logits
        layout = model._restore_ctx.layout
    assert int(layout.is_visual.sum()) == n_vis
    assert torch.equal(layout.positions[0], torch.arange(layout.length))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_visionzip_with_restore_keeps_dominant_tokens_and_merges_the_rest(deep, prompt):
    _, model, _ = deep
    ids, images = prompt
    with torch.inference_mode():
        tokens = encode_visual_tokens(model, images)
        reduced = restore.reduce_visual_tokens(tokens, "VisionZip", 64, restore=True)
    dominant = tr.get_selector("VisionZip")(tokens, 32)[0]
    singles = reduced.positions[0][reduced.sizes[0] == 1]
    assert set(dominant.tolist()) <= set(singles.tolist())
    assert float(reduced.sizes.sum()) == 576 and (reduced.positions.diff(dim=1) > 0).all()
    uniform = restore.reduce_visual_tokens(tokens, "VisionZip", 64, restore=True, anchors="uniform")
    assert not torch.equal(uniform.positions, reduced.positions)  # Table 6: anchors change the groups


@pytest.mark.parametrize("n_vis", [64, 192])
def test_plain_tome_feeds_the_merged_select_layer_in_its_order(deep, prompt, n_vis):
    _, model, _ = deep
    ids, images = prompt
    with torch.inference_mode():
        merged = encode_with_tome(model.get_vision_tower(), images, n_vis)
        expected = _logits_on(model, ids, model.get_model().mm_projector(merged.features)[0])
        restore.apply(model, base="ToMe", n_vis=n_vis)
        out = model(input_ids=ids, images=images).logits
        layout = model._restore_ctx.layout
    assert int(layout.is_visual.sum()) == n_vis and torch.all(layout.sizes[layout.is_visual] >= 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert model.get_vision_tower().vision_tower.vision_model.encoder.layers[0].__class__.__name__ == "CLIPEncoderLayer"


def test_tome_with_retained_positions_and_calibration(deep, prompt):
    _, model, _ = deep
    ids, images = prompt
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero())
    with torch.inference_mode():
        merged = encode_with_tome(model.get_vision_tower(), images, 64)
        restore.apply(model, base="ToMe", n_vis=64, restore=True)
        settings = restore.settings_of(model)
        model(input_ids=ids, images=images)
        layout = model._restore_ctx.layout
    assert settings.calibrates and settings.retains_positions and settings.merges
    assert restore.run_tag(settings) == "tome-64-restore"
    visual = layout.positions[0, layout.is_visual[0]] - at
    # each token sits at the lower median of the patches ToMe merged into it
    medians = []
    for token in range(64):
        patches = sorted((merged.source[0] == token).nonzero().flatten().tolist())
        medians.append(patches[(len(patches) - 1) // 2])
    assert visual.tolist() == sorted(medians)
    assert float(layout.sizes[layout.is_visual].sum()) == 576
    with pytest.raises(ValueError, match="merges tokens itself"):
        restore.apply(model, base="ToMe", n_vis=64, restore=True, prune_ratio=0.75)
    restore.remove(model)


@pytest.mark.parametrize("base,use_restore", [("ToMe", False), ("VisionZip", False), ("VisionZip", True)])
def test_token_maps_and_bench_rows_of_the_vision_methods(deep, prompt, base, use_restore):
    from restore import bench
    from restore.analysis.models import BenchModel
    from restore.analysis.timing import Timer
    from restore.analysis.token_map import build_token_map

    tok, model, proc = deep
    loaded = BenchModel(tok, model, proc, "deep small checkpoint")
    _, images = prompt
    token_map = build_token_map(loaded, images, base, 64, use_restore)
    sizes = token_map.group_sizes()
    assert (token_map.source >= 0).all() and int(sizes.sum()) == 576  # every patch lives in some token
    kept = set(token_map.kept.tolist())
    assert all(sizes[token_map.source[p]] == 1 for p in kept)
    if base == "VisionZip" and use_restore:
        assert len(kept) >= 32  # its 32 dominant tokens
    config = bench.Config(base, 64, use_restore)
    timer = Timer(torch.device("cpu"), repeats=1, warmup=0)
    tokens = bench.visual_tokens(loaded, images)
    row = bench.time_reduction(tokens, config, timer, loaded, bench.Prompt(None, images, None))
    if base == "ToMe":
        assert row == {"selection_ms": None, "merging_ms": None, "reduce_ms": None}
        assert bench.time_vision_encoder_method(loaded, bench.Prompt(None, images, None), config, timer) > 0
    else:
        assert row["reduce_ms"] > 0 and (row["selection_ms"] is not None) == use_restore


def test_tome_budget_is_checked_from_the_configs(small_checkpoint, tmp_path):
    from llava_patches.tome import check_tome_budget

    with pytest.raises(ValueError, match="runs 2 layers before LLaVA's select layer"):
        check_tome_budget(str(small_checkpoint), 64)  # 576 -> at least 144 in two halvings
    check_tome_budget(str(small_checkpoint), 144)
    check_tome_budget("liuhaotian/llava-v1.5-7b", 1)  # not local: nothing to read, CLIP-L reaches any budget
