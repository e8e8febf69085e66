"""LLaVA-NeXT (anyres) on the small random NeXT checkpoint: the unreduced path is stock llava, reduced rows
follow docs/llava_next.md part 3 (fixed 2x2 grid, 2880 tokens, budget scope per method).

Restatements here are written from the layout's definition (base view, then the 48x48 canvas stitched
as stock llava stitches it), not from llava_patches/next_layout.py, so that they check it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

import restore
import tokenreduction as tr
from llava_patches.family import FAMILY
from llava_patches.loading import load_model
from llava_patches.next_reduce import encode_next_tokens, per_view_selector, reduce_next_images
from llava_patches.vision import encode_visual_tokens
from restore.reduce import reduce_visual_tokens
from restore.small_checkpoint import synthetic_image
from restore.small_next_checkpoint import build_small_next_checkpoint
from tokenreduction.visionzip import visionzip_reduce

BASES = ["HoloV", "DivPrune", "VisPruner", "VisionZip"]
PER_VIEW = ["VisPruner", "VisionZip"]
GLOBAL = ["HoloV", "DivPrune"]
SIZES = [(640, 480), (200, 900), (1000, 250)]  # grids 2x2, 1x3, 3x1 natively
N_IMAGE = 2880
SIDE = 24


class Loaded(NamedTuple):
    tokenizer: Any
    model: torch.nn.Module
    image_processor: Any


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_next_checkpoint(tmp_path_factory.mktemp("next") / "llava-v1.6-small-random", seed=0)


@pytest.fixture(scope="module")
def next_model(next_checkpoint: Path) -> Loaded:
    tokenizer, model, processor, _ = load_model(next_checkpoint, device="cpu", dtype="float32")
    return Loaded(tokenizer, model, processor)


@pytest.fixture
def model(next_model):
    try:
        yield next_model.model
    finally:
        restore.remove(next_model.model)


def prompt(tokenizer, question: str = "What is shown in the image?") -> torch.Tensor:
    return FAMILY.prompt_ids(tokenizer, question, True, "vicuna_v1", None)[None]


def grid_views(next_model, sizes, seed: int = 0) -> torch.Tensor:
    """[I, 5, 3, 336, 336]: the reduced rows' pixels of synthetic images of ``sizes``."""
    settings = object()  # any configuration: reduced rows share one preprocessing
    return torch.stack([FAMILY.preprocess_image(synthetic_image(seed + i, size), next_model.image_processor,
                                                next_model.model.config, settings) for i, size in enumerate(sizes)])


def sequence_position(view: int, local: torch.Tensor) -> torch.Tensor:
    """Where token ``local`` of ``view`` sits in the 2880 sequence: base view first, then the canvas."""
    if view == 0:
        return local
    row, column = divmod(view - 1, 2)
    return SIDE * SIDE + (row * SIDE + local // SIDE) * 2 * SIDE + column * SIDE + local % SIDE


def stitched(per_view: torch.Tensor) -> torch.Tensor:
    """[5, 576, ...] -> [2880, ...] the way stock llava stitches the crops (its non-unpad 'spatial' path)."""
    rest = per_view.shape[2:]
    grid = per_view[1:].reshape(2, 2, SIDE, SIDE, *rest).transpose(1, 2).reshape(4 * SIDE * SIDE, *rest)
    return torch.cat([per_view[0], grid])


def view_tokens(flat: tr.VisualTokens, row: int) -> tr.VisualTokens:
    """One view's tokens alone, as the 1.5 path gives one image (row ``row`` of the tower's batch)."""
    def pick(x):
        return None if x is None else x[row:row + 1].contiguous()
    return tr.VisualTokens(features=pick(flat.features), raw_features=pick(flat.raw_features),
                           cls_attention=pick(flat.cls_attention), keys=pick(flat.keys),
                           cls_raw_feature=pick(flat.cls_raw_feature))


def encode_flat(model, views: torch.Tensor) -> tr.VisualTokens:
    with torch.inference_mode():
        return encode_visual_tokens(model, views.flatten(0, 1), with_keys=True, with_cls=True)


# --------------------------------------------------------------------------------------------------
# The unreduced path is stock llava-torch


def test_family_sees_next(next_model):
    model = next_model.model
    assert FAMILY.check_model(model) == N_IMAGE
    config = {"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[336, 672], [672, 672]]}
    assert FAMILY.visual_tokens_per_image(config) == N_IMAGE
    assert FAMILY.visual_tokens_per_image({"image_aspect_ratio": "pad"}) == 576
    settings = restore.settings.resolve_settings("HoloV", 320, True, N_IMAGE)
    assert FAMILY.preprocessing_key(model.config, None) == "native"
    assert FAMILY.preprocessing_key(model.config, settings) == "grid2x2"
    pad = type("Config", (), {"image_aspect_ratio": "pad"})()
    assert FAMILY.preprocessing_key(pad, None) == FAMILY.preprocessing_key(pad, settings)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_unreduced_is_stock(model, next_model, size):
    from llava.mm_utils import process_images

    image = synthetic_image(3, size)
    stock_pixels = process_images([image], next_model.image_processor, model.config)
    pixels = FAMILY.preprocess_image(image, next_model.image_processor, model.config, None)
    assert torch.equal(pixels, stock_pixels[0])
    ids = prompt(next_model.tokenizer)
    with torch.inference_mode():
        stock_logits = model(input_ids=ids, images=stock_pixels, image_sizes=[image.size]).logits
        stock_tokens = model.generate(ids, images=stock_pixels, image_sizes=[image.size], do_sample=False,
                                      max_new_tokens=4, use_cache=True)
    restore.apply(model, base="HoloV", n_vis=320, restore=True)
    assert restore.apply(model, base=None) is model and not restore.is_applied(model)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids, images=pixels[None], image_sizes=[image.size]).logits, stock_logits)
        assert torch.equal(model.generate(ids, images=pixels[None], image_sizes=[image.size], do_sample=False,
                                          max_new_tokens=4, use_cache=True), stock_tokens)


def test_fixed_grid_is_stock_anyres_of_a_2x2_image(next_model):
    # A 4:3 photo picks the 2x2 grid natively: the fixed grid must give exactly stock's pixels.
    from llava.mm_utils import process_images

    image = synthetic_image(5, (640, 480))
    stock = process_images([image], next_model.image_processor, next_model.model.config)[0]
    assert torch.equal(grid_views(next_model, [(640, 480)], seed=5)[0], stock)
    # Any other aspect ratio is letterboxed into the same 2x2 grid.
    assert grid_views(next_model, [(200, 900), (1000, 250)]).shape == (2, 5, 3, 336, 336)


def test_sequence_is_stock_spatial_layout(model, next_model):
    """The 2880 tokens are what stock llava feeds without unpadding or newlines ('spatial' merge type)."""
    views = grid_views(next_model, [(640, 480)])
    ids = prompt(next_model.tokenizer)
    start = int((ids[0] < 0).nonzero()[0, 0])
    merge_type = model.config.mm_patch_merge_type
    model.config.mm_patch_merge_type = "spatial"
    try:
        with torch.inference_mode():
            embeds = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, views,
                                                                image_sizes=[(640, 480)])[4]
    finally:
        model.config.mm_patch_merge_type = merge_type
    assert embeds.shape[1] == ids.shape[1] - 1 + N_IMAGE
    with torch.inference_mode():
        tokens = encode_next_tokens(model, views)
    torch.testing.assert_close(tokens.whole.features[0], embeds[0, start:start + N_IMAGE], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Reduced rows: invariants of every base, with and without RESTORE


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("n_vis", [320, 160])
@pytest.mark.parametrize("use_restore", [False, True], ids=["plain", "restore"])
def test_layout_invariants(model, next_model, base, n_vis, use_restore):
    restore.apply(model, base=base, n_vis=n_vis, restore=use_restore)
    settings = restore.settings_of(model)
    assert settings.num_patches == N_IMAGE
    ids = prompt(next_model.tokenizer).repeat(2, 1)
    start = int((ids[0] < 0).nonzero()[0, 0])
    views = grid_views(next_model, [(640, 480), (200, 900)])
    with torch.inference_mode():
        embeds = model.prepare_inputs_labels_for_multimodal(ids, None, torch.ones_like(ids), None, None, views)[4]
    layout = model._restore_ctx.layout
    assert embeds.shape[1] == ids.shape[1] - 1 + n_vis
    assert layout.is_visual.sum(dim=1).tolist() == [n_vis, n_vis]
    visual = layout.positions[layout.is_visual].view(2, n_vis)
    after = layout.positions[:, start + n_vis]  # the first text token after the image
    if use_restore:
        assert torch.equal(layout.sizes[layout.is_visual].view(2, n_vis).sum(dim=1), torch.full((2,), float(N_IMAGE)))
        assert bool((visual.diff(dim=1) > 0).all()) and bool((visual >= start).all())
        assert bool((visual < start + N_IMAGE).all())
        assert after.tolist() == [start + N_IMAGE] * 2
        with torch.inference_mode():
            first, later = model.get_model()._restore_masks(layout, None, 0, layout.length)
        assert bool(torch.isfinite(first).all()) and bool(torch.isfinite(later).all())
        allowed = torch.ones(layout.length, layout.length, dtype=torch.bool).tril()
        assert bool((later[:, 0][:, allowed] > torch.finfo(later.dtype).min / 2).all())
    else:
        assert torch.equal(visual, start + torch.arange(n_vis).expand(2, -1))
        assert after.tolist() == [start + n_vis] * 2
    assert layout.max_next == int(layout.positions.max()) + 1


@pytest.mark.parametrize("base", ["HoloV", "VisionZip"])
def test_generates(model, next_model, base):
    restore.apply(model, base=base, n_vis=160, restore=True)
    views = grid_views(next_model, [(640, 480)])
    with torch.inference_mode():
        out = model.generate(prompt(next_model.tokenizer), images=views, image_sizes=[(640, 480)], do_sample=False,
                             max_new_tokens=4, use_cache=True)
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 5  # as stock: a start token, then at most 4


# --------------------------------------------------------------------------------------------------
# Budget scope: per view for VisPruner and VisionZip, over the whole image for HoloV and DivPrune


def _settings(base, n_vis, use_restore):
    return restore.settings.resolve_settings(base, n_vis, use_restore, N_IMAGE, acts=tr.acts_in(base))


@pytest.mark.parametrize("base", PER_VIEW)
@pytest.mark.parametrize("n_keep", [320, 160, 80])
def test_per_view_selection_is_the_selector_on_each_view(model, next_model, base, n_keep):
    views = grid_views(next_model, [(640, 480)])
    flat = encode_flat(model, views)
    expected = []
    for v in range(5):
        local = tr.get_selector(base)(view_tokens(flat, v), n_keep // 5)[0]
        expected.append(sequence_position(v, local))
    expected = torch.cat([expected[0], torch.cat(expected[1:]).sort().values])
    with torch.inference_mode():
        tokens = encode_next_tokens(model, views, with_keys=True, with_cls=True)
        keep = per_view_selector(base, tokens)(tokens.whole, n_keep)
    assert torch.equal(keep[0], expected)


@pytest.mark.parametrize("base", PER_VIEW)
@pytest.mark.parametrize("n_vis", [320, 160])
def test_per_view_rows_use_the_per_view_selection(model, next_model, base, n_vis):
    views = grid_views(next_model, [(640, 480)])
    with torch.inference_mode():
        tokens = encode_next_tokens(model, views, with_keys=True, with_cls=True)
        select = per_view_selector(base, tokens)
        project = model.get_model().mm_projector
        for use_restore in (False, True):
            settings = _settings(base, n_vis, use_restore)
            got = reduce_next_images(model, views, settings)
            if base == "VisionZip" and not use_restore:
                continue  # its own plain row: test_visionzip_plain_row_is_the_official_order
            want = reduce_visual_tokens(tokens.whole, settings, project=project,
                                        select=lambda _t, k: select(tokens.whole, k))
            assert torch.equal(got.positions, want.positions) and torch.equal(got.features, want.features)
            assert torch.equal(got.sizes, want.sizes)
            if not use_restore:  # the plain row feeds exactly the per-view picks, n_vis / 5 per view
                assert torch.equal(got.positions, select(tokens.whole, n_vis))
                view_of = torch.empty(N_IMAGE, dtype=torch.long)
                for v in range(5):
                    view_of[sequence_position(v, torch.arange(576))] = v
                assert view_of[got.positions[0]].bincount(minlength=5).tolist() == [n_vis // 5] * 5


@pytest.mark.parametrize("n_vis", [320, 160])
def test_visionzip_plain_row_is_the_official_order(model, next_model, n_vis):
    """Base view [CLS, dominant, contextual]; the crops' dominant patches read off the stitched canvas;
    the crops' CLS tokens; all their contextual tokens, crop after crop (VisionZip's NeXT assembly)."""
    views = grid_views(next_model, [(640, 480)])
    flat = encode_flat(model, views)
    outs = [visionzip_reduce(view_tokens(flat, v), n_vis // 5) for v in range(5)]
    raw = flat.raw_features
    on_map = torch.zeros(4, 576, raw.shape[-1])
    kept = torch.zeros(4, 576, dtype=torch.bool)
    for c in range(4):
        on_map[c, outs[1 + c].dominant[0]] = raw[1 + c, outs[1 + c].dominant[0]]
        kept[c, outs[1 + c].dominant[0]] = True
    canvas, canvas_kept = stitched(torch.cat([on_map[:1], on_map]))[576:], stitched(torch.cat([kept[:1], kept]))[576:]
    sequence = torch.cat([outs[0].raw_sequence[0], canvas[canvas_kept],
                          torch.cat([o.cls[0] for o in outs[1:]]), torch.cat([o.contextual[0] for o in outs[1:]])])
    with torch.inference_mode():
        expected = model.get_model().mm_projector(sequence[None])
        got = reduce_next_images(model, views, _settings("VisionZip", n_vis, False))
    assert got.features.shape == (1, n_vis, expected.shape[-1])
    torch.testing.assert_close(got.features, expected, rtol=0, atol=0)
    assert torch.equal(got.sizes.sum(dim=1), torch.tensor([N_IMAGE + 5.0]))  # five CLS tokens stand for no patch
    # Every patch is in one token, as many as the token's size; the five CLS tokens hold none.
    cls_slots = [0] + [n_vis // 5 + int(canvas_kept.sum()) + c for c in range(4)]
    held = got.source[0].bincount(minlength=n_vis).float()
    assert int(got.source.min()) >= 0 and held[cls_slots].eq(0).all()
    others = torch.ones(n_vis, dtype=torch.bool)
    others[cls_slots] = False
    assert torch.equal(held[others], got.sizes[0, others])


@pytest.mark.parametrize("base", GLOBAL)
@pytest.mark.parametrize("n_vis", [320, 160])
def test_global_selection_is_the_selector_on_the_whole_image(model, next_model, base, n_vis):
    views = grid_views(next_model, [(640, 480)])
    flat = encode_flat(model, views)
    whole = tr.VisualTokens(features=stitched(flat.features)[None], raw_features=stitched(flat.raw_features)[None],
                            cls_attention=stitched(flat.cls_attention)[None])
    expected = tr.get_selector(base)(whole, n_vis)
    with torch.inference_mode():
        got = reduce_next_images(model, views, _settings(base, n_vis, False))
        assert torch.equal(got.positions, expected)
        restored = reduce_next_images(model, views, _settings(base, n_vis, True))
        want = reduce_visual_tokens(whole, _settings(base, n_vis, True), project=model.get_model().mm_projector)
    assert torch.equal(restored.positions, want.positions)
    torch.testing.assert_close(restored.features, want.features, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Batches and the cache


@pytest.mark.parametrize("base", BASES)
def test_batch_is_per_sample(model, next_model, base):
    sizes = [(640, 480), (200, 900)]
    views = grid_views(next_model, sizes)
    for use_restore in (False, True):
        settings = _settings(base, 160, use_restore)
        with torch.inference_mode():
            together = reduce_next_images(model, views, settings)
            for i in range(2):
                alone = reduce_next_images(model, views[i:i + 1], settings)
                assert torch.equal(together.positions[i], alone.positions[0])
                assert torch.equal(together.sizes[i], alone.sizes[0])
                torch.testing.assert_close(together.features[i], alone.features[0], rtol=1e-5, atol=1e-5)


def test_generation_with_cache_equals_recomputation(model, next_model):
    # Size-only calibration: the decoding masks then are the prefill's rows, so a cached step and a
    # prefill of the longer prompt must agree (with the distance term decoding is size-only by design).
    restore.apply(model, base="HoloV", n_vis=160, restore=True, calibration="size")
    views = grid_views(next_model, [(640, 480)])
    ids = prompt(next_model.tokenizer)
    with torch.inference_mode():
        out = model.generate(ids, images=views, image_sizes=[(640, 480)], do_sample=False, max_new_tokens=4,
                             use_cache=True, output_scores=True, return_dict_in_generate=True)
        cached, scores = out.sequences, torch.stack(out.scores, dim=1)
        steps = scores.shape[1]
        assert steps == 4  # no end of sequence on this prompt: every step is compared
        generated = torch.empty(1, 0, dtype=torch.long)
        recomputed = []
        for _ in range(steps):
            logits = model(input_ids=torch.cat([ids, generated], dim=1), images=views, image_sizes=[(640, 480)]).logits
            recomputed.append(logits[:, -1])
            generated = torch.cat([generated, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(cached[:, -steps:], generated)
    torch.testing.assert_close(scores, torch.stack(recomputed, dim=1), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# What NeXT refuses


def test_tome_and_native_pixels_are_refused(model, next_model, next_checkpoint):
    with pytest.raises(ValueError, match="LLaVA-NeXT"):
        restore.apply(model, base="ToMe", n_vis=320)
    with pytest.raises(ValueError, match="LLaVA-NeXT"):  # before loading, from the checkpoint's config
        FAMILY.check_budget(str(next_checkpoint), _settings("ToMe", 320, False))
    with pytest.raises(ValueError, match="inside the LLM.*LLaVA-NeXT"):  # the in-LLM methods: LLaVA-1.5 only
        restore.apply(model, base="FastV", n_vis=320)
    with pytest.raises(ValueError, match="at least 5"):  # plain VisionZip reduces every view on its own
        restore.apply(model, base="VisionZip", n_vis=4)
    restore.apply(model, base="VisionZip", n_vis=4, restore=True)  # 2 selected (views 0 and 1), 2 merged
    with torch.inference_mode():
        tiny = reduce_next_images(model, grid_views(next_model, [(640, 480)]), restore.settings_of(model))
    assert tiny.positions.shape == (1, 4) and float(tiny.sizes.sum()) == N_IMAGE
    restore.apply(model, base="HoloV", n_vis=320)
    from llava.mm_utils import process_images

    image = synthetic_image(0, (200, 900))  # natively 1x3: four views, not the fixed grid's five
    native = process_images([image], next_model.image_processor, model.config)
    with pytest.raises(ValueError, match="fixed 2x2 grid"), torch.inference_mode():
        model(input_ids=prompt(next_model.tokenizer), images=native, image_sizes=[image.size])


# --------------------------------------------------------------------------------------------------
# End to end through the evaluation entry point


def test_vqa_loader_end_to_end(next_checkpoint, tmp_path):
    """A sweep (stock + reduced rows, two preprocessings) answers as separate runs; n_vis above 576 is
    accepted because the checkpoint's family says 2880."""
    import json

    from restore.eval import vqa_loader
    from restore.eval.fixtures import make_fixtures

    model_path = str(next_checkpoint)
    make_fixtures(tmp_path / "data", n=3, seed=1, benchmarks=["gqa"])
    gqa = tmp_path / "data" / "gqa"
    common = ["--model-path", model_path, "--question-file", str(gqa / "llava_gqa_testdev_balanced.jsonl"),
              "--image-folder", str(gqa / "data" / "images"), "--device", "cpu", "--dtype", "float32",
              "--max_new_tokens", "3"]
    assert vqa_loader.main([*common, "--answers-file", str(tmp_path / "sweep" / "{config}.jsonl"),
                            "--configs", "full,HoloV-640-restore,VisPruner-160"]) == 0
    assert vqa_loader.main([*common, "--answers-file", str(tmp_path / "alone.jsonl"),
                            "--base", "HoloV", "--n_vis", "640", "--restore"]) == 0

    def answers(path):
        return {line["question_id"]: line["text"] for line in map(json.loads, path.read_text().splitlines())}

    alone = answers(tmp_path / "alone.jsonl")
    assert len(alone) == 3 and answers(tmp_path / "sweep" / "holov-640-restore.jsonl") == alone
    assert len(answers(tmp_path / "sweep" / "full.jsonl")) == len(answers(tmp_path / "sweep" / "vispruner-160.jsonl")) == 3


def test_images_are_checked_with_every_preprocessing_a_sweep_uses(next_checkpoint):
    """Stock NeXT pixels for the unreduced row, the fixed grid for reduced rows: the up-front image check
    runs both, each once per image shape."""
    from types import SimpleNamespace

    from PIL import Image

    from llava_patches.family import FAMILY
    from restore.eval.runner import _preprocessing_of_every_configuration
    from restore.settings import resolve_settings

    reduced = resolve_settings("HoloV", 320, True, 2880)
    plans = [SimpleNamespace(args=SimpleNamespace(model_path=str(next_checkpoint), family=FAMILY, reduction=r))
             for r in (None, reduced, resolve_settings("DivPrune", 160, False, 2880))]
    pixels = _preprocessing_of_every_configuration(plans)(Image.new("RGB", (1000, 250), (10, 200, 30)))
    assert sorted(p.shape[0] for p in pixels) == [4, 5]  # native 3x1 grid + base view; fixed 2x2 + base view
    only_reduced = _preprocessing_of_every_configuration(plans[1:])(Image.new("RGB", (1000, 250)))
    assert only_reduced.shape[0] == 5
