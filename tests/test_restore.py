"""restore.apply on the small LLaVA-1.5 checkpoint: stock equality, invariants, batching, errors."""
import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX

import restore
from llava_patches.loading import load_model

BASES = ["HoloV", "DivPrune", "VisPruner"]
QUESTIONS = ["What is in the image?", "Is there a red circle?\nAnswer the question using a single word or phrase."]


@pytest.fixture
def prompts(small_model, make_inputs, synthetic_image):
    tok, _, proc = small_model
    return [make_inputs(tok, proc, q, synthetic_image(i, (400 + 60 * i, 300)), model_config=small_model.model.config)
            for i, q in enumerate(QUESTIONS)]


def generate(model, ids, images, n=5, **kw):
    kw.setdefault("do_sample", False)
    with torch.inference_mode():
        out = model.generate(ids, images=images, max_new_tokens=n, use_cache=True, num_beams=1,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.scores, dim=1)


def prefill_logits(model, ids, images, **kw):
    with torch.inference_mode():
        return model(input_ids=ids, images=images, **kw).logits


def test_no_base_is_stock(model, prompts):
    ids, img = prompts[0]
    stock = prefill_logits(model, ids, img)
    assert restore.apply(model, base=None) is model and not restore.is_applied(model)
    assert torch.equal(prefill_logits(model, ids, img), stock)


def test_full_budget_in_patch_order_equals_stock(model, prompts):
    # VisPruner keeps tokens in ascending order: at n_vis = N it must reproduce stock LLaVA through
    # our vision path and input assembly.
    for ids, img in prompts:
        stock_tokens, stock_scores = generate(model, ids, img)
        restore.apply(model, base="VisPruner", n_vis=576)
        tokens, scores = generate(model, ids, img)
        restore.remove(model)
        assert torch.equal(tokens, stock_tokens)
        torch.testing.assert_close(scores, stock_scores, rtol=1e-4, atol=1e-4)


def test_remove_round_trip(model, prompts):
    ids, img = prompts[1]
    classes = {name: type(m) for name, m in model.named_modules()}
    stock = prefill_logits(model, ids, img)
    restore.apply(model, base="HoloV", n_vis=64, restore=True)
    reduced = prefill_logits(model, ids, img)
    assert reduced.shape[1] == stock.shape[1] - 576 + 64
    restore.apply(model, base="DivPrune", n_vis=128)  # reconfigure in place
    assert restore.settings_of(model).base == "DivPrune" and not restore.settings_of(model).restore
    restore.remove(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert not any(hasattr(m, "_restore_ctx") for m in model.modules())
    assert torch.equal(prefill_logits(model, ids, img), stock)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("n_vis,use_restore", [(64, True), (128, True), (64, False), (37, True)])
def test_layout_invariants(model, prompts, base, n_vis, use_restore):
    ids, img = prompts[0]
    restore.apply(model, base=base, n_vis=n_vis, restore=use_restore)
    logits = prefill_logits(model, ids, img)
    layout = model._restore_ctx.layout
    image_at = (ids[0] == IMAGE_TOKEN_INDEX).nonzero().item()
    assert logits.shape[1] == ids.shape[1] - 1 + n_vis and torch.isfinite(logits).all()
    assert int(layout.is_visual.sum()) == n_vis
    positions = layout.positions[0]
    if use_restore:
        assert float(layout.sizes[layout.is_visual].sum()) == 576.0
        assert (positions.diff() > 0).all()
        assert positions[:image_at].tolist() == list(range(image_at))
        visual = positions[layout.is_visual[0]] - image_at
        assert visual.min() >= 0 and visual.max() < 576
        after = positions[image_at + n_vis:]
        assert after.tolist() == list(range(image_at + 576, image_at + 576 + len(after)))
        assert int(layout.next_position[0]) == ids.shape[1] - 1 + 576
    else:
        assert positions.tolist() == list(range(positions.shape[0]))
        assert int(layout.next_position[0]) == ids.shape[1] - 1 + n_vis


def test_calibrated_masks_are_finite_and_causal(model, prompts):
    ids, img = prompts[0]
    restore.apply(model, base="HoloV", n_vis=64, restore=True)
    seen = []
    attn = model.get_model().layers[1].self_attn
    # the mask the calibrated attention of a later layer uses (layer 0 sees uniform sizes)
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.append(m._restore_ctx.masks[1].clone()), with_kwargs=True)
    try:
        generate(model, ids, img, n=2)
    finally:
        hook.remove()
    prefill, decode = seen[0][0, 0], seen[1][0, 0]
    L = prefill.shape[0]
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.isfinite(prefill[allowed]).all()
    assert (prefill[~allowed] == torch.finfo(prefill.dtype).min).all()
    # decoding: log sizes only, the first key is the BOS token (size 1), visual groups carry log(size)
    layout = model._restore_ctx.layout
    assert decode.shape == (1, L + 1)
    torch.testing.assert_close(decode[0, :L], layout.sizes[0].log())
    assert decode[0, L] == 0


def test_decode_positions_continue_at_full_length(model, prompts):
    ids, img = prompts[1]
    restore.apply(model, base="DivPrune", n_vis=64, restore=True)
    seen = []
    layer = model.get_model().layers[0]
    hook = layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        generate(model, ids, img, n=3)
    finally:
        hook.remove()
    full_length = ids.shape[1] - 1 + 576
    assert [p.tolist() for p in seen[1:]] == [[[full_length]], [[full_length + 1]]]


def test_image_position_found_for_any_prompt_length(model, small_model, synthetic_image):
    tok, _, proc = small_model
    from llava_patches.loading import make_inputs
    for conv in ["vicuna_v1", "llava_v1", "plain"]:
        ids, img = make_inputs(tok, proc, "Describe it.", synthetic_image(3), conv, model_config=model.config)
        restore.apply(model, base="VisPruner", n_vis=64, restore=True)
        prefill_logits(model, ids, img)
        image_at = (ids[0] == IMAGE_TOKEN_INDEX).nonzero().item()
        layout = model._restore_ctx.layout
        assert layout.is_visual[0, image_at:image_at + 64].all() and not layout.is_visual[0, :image_at].any()


def test_text_only_prompt_untouched(model, small_model):
    ids = small_model.tokenizer("USER: hello there ASSISTANT:", return_tensors="pt").input_ids
    with torch.inference_mode():
        stock = model.generate(ids, max_new_tokens=4, do_sample=False)
    restore.apply(model, base="HoloV", n_vis=64, restore=True)
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), stock)


def _pad_batch(prompts, side):
    longest = max(ids.shape[1] for ids, _ in prompts)
    rows, masks = [], []
    for ids, _ in prompts:
        pad = torch.zeros(1, longest - ids.shape[1], dtype=ids.dtype)
        mask = torch.ones_like(ids)
        rows.append(torch.cat([pad, ids], 1) if side == "left" else torch.cat([ids, pad], 1))
        masks.append(torch.cat([torch.zeros_like(pad), mask], 1) if side == "left" else torch.cat([mask, torch.zeros_like(pad)], 1))
    return torch.cat(rows), torch.cat(masks), torch.cat([img for _, img in prompts])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("use_restore", [True, False])
def test_batch_generate_equals_per_sample(model, prompts, side, use_restore):
    restore.apply(model, base="HoloV", n_vis=64, restore=use_restore)
    alone = [generate(model, ids, img, n=4) for ids, img in prompts]
    ids, mask, images = _pad_batch(prompts, side)  # the tokenizer's padding side
    tokens, scores = generate(model, ids, images, n=4, attention_mask=mask)
    for b, (one_tokens, one_scores) in enumerate(alone):
        assert tokens[b, -4:].tolist() == one_tokens[0, -4:].tolist()
        torch.testing.assert_close(scores[b], one_scores[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_forward_equals_per_sample(model, prompts, side):
    restore.apply(model, base="DivPrune", n_vis=64, restore=True)
    alone = [prefill_logits(model, ids, img)[0] for ids, img in prompts]
    ids, mask, images = _pad_batch(prompts, "right")
    old_side = model.config.tokenizer_padding_side
    model.config.tokenizer_padding_side = side  # the assembled sequence is padded like stock LLaVA
    try:
        logits = prefill_logits(model, ids, images, attention_mask=mask)
    finally:
        model.config.tokenizer_padding_side = old_side
    for b, one in enumerate(alone):
        real = logits[b, -one.shape[0]:] if side == "left" else logits[b, :one.shape[0]]
        torch.testing.assert_close(real, one, rtol=1e-4, atol=1e-4)


def test_plain_forward_matches_generate_first_step(model, prompts):
    ids, img = prompts[0]
    restore.apply(model, base="VisPruner", n_vis=128, restore=True)
    _, scores = generate(model, ids, img, n=1)
    torch.testing.assert_close(prefill_logits(model, ids, img)[0, -1], scores[0, 0], rtol=1e-5, atol=1e-5)


def test_beam_search_and_several_sequences(model, prompts):
    ids, img = prompts[0]
    restore.apply(model, base="HoloV", n_vis=64, restore=True)
    greedy, _ = generate(model, ids, img, n=4)
    with torch.inference_mode():
        beams = model.generate(ids, images=img, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
        assert model._restore_ctx.layout.positions.shape[0] == 2  # the prompt's layout, once per beam
        one_beam = model.generate(ids, images=img, max_new_tokens=4, num_beams=1, do_sample=False)
    assert beams.shape[0] == 2 and torch.equal(one_beam, greedy)


def test_sampling_is_seeded_and_uses_the_reduced_model(model, prompts):
    ids, img = prompts[0]
    restore.apply(model, base="HoloV", n_vis=64, restore=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(generate(model, ids, img, n=6, do_sample=True, temperature=1.5)[0])
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(1)
    assert not torch.equal(generate(model, ids, img, n=6, do_sample=True, temperature=1.5)[0], runs[0])


def test_text_only_sample_in_a_batch_with_images(model, prompts, small_model):
    """A prompt without an image runs as it would alone (no calibration), beside a reduced one."""
    text_ids = small_model.tokenizer("USER: hello there ASSISTANT:", return_tensors="pt").input_ids
    img_ids, img = prompts[0]
    restore.apply(model, base="HoloV", n_vis=64, restore=True)
    alone_text = prefill_logits(model, text_ids, None)[0]
    alone_img = prefill_logits(model, img_ids, img)[0]
    ids, mask, _ = _pad_batch([(img_ids, img), (text_ids, img)], "right")
    # LLaVA's convention: a sample without a placeholder still takes (and ignores) one image
    logits = prefill_logits(model, ids, torch.cat([img, img]), attention_mask=mask)
    torch.testing.assert_close(logits[0, :alone_img.shape[0]], alone_img, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1, :alone_text.shape[0]], alone_text, rtol=1e-4, atol=1e-4)


def test_two_images_in_one_prompt(model, small_model, synthetic_image):
    tok, _, proc = small_model
    from llava_patches.loading import make_inputs
    ids, first = make_inputs(tok, proc, "<image>\nCompare with <image>\nthis one.", synthetic_image(1), model_config=model.config)
    _, second = make_inputs(tok, proc, "x", synthetic_image(2), model_config=model.config)
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 2
    restore.apply(model, base="DivPrune", n_vis=32, restore=True)
    logits = prefill_logits(model, ids, torch.cat([first, second]))
    layout = model._restore_ctx.layout
    slots = (ids[0] == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    assert logits.shape[1] == ids.shape[1] - 2 + 64 and int(layout.is_visual.sum()) == 64
    positions = layout.positions[0]
    assert (positions.diff() > 0).all()
    # each image spans 576 positions; the text after the second one continues after both spans
    assert int(positions[-1]) == ids.shape[1] - 2 + 2 * 576 - 1
    assert int(layout.next_position[0]) == ids.shape[1] - 2 + 2 * 576
    second_start = slots[1] - 1 + 576  # text tokens before it, then the first image's 576 positions
    visual = positions[layout.is_visual[0]]
    assert (visual[:32] < second_start).all() and (visual[32:] >= second_start).all()


@pytest.mark.parametrize("n_vis", [2, 576])
def test_extreme_budgets_with_restore(model, prompts, n_vis):
    ids, img = prompts[1]
    restore.apply(model, base="VisPruner", n_vis=n_vis, restore=True)
    logits = prefill_logits(model, ids, img)
    layout = model._restore_ctx.layout
    assert logits.shape[1] == ids.shape[1] - 1 + n_vis and torch.isfinite(logits).all()
    assert float(layout.sizes[layout.is_visual].sum()) == 576.0


def test_images_that_do_not_fit_the_prompt(model, prompts):
    ids, img = prompts[0]
    restore.apply(model, base="HoloV", n_vis=64, restore=True)
    with pytest.raises(NotImplementedError, match="one crop per image"):
        prefill_logits(model, ids, img.unsqueeze(1).expand(1, 2, -1, -1, -1))
    two_slots = torch.cat([ids, ids[:, -3:]], dim=1)
    two_slots[0, -2] = IMAGE_TOKEN_INDEX
    with pytest.raises(ValueError, match="more <image> placeholders than the 1 images"):
        prefill_logits(model, two_slots, img)


def test_two_models_carry_their_own_settings(small_checkpoint, small_model, prompts):
    first = small_model.model
    second = load_model(small_checkpoint, device="cpu", dtype="float32")[1]
    ids, img = prompts[0]
    try:
        restore.apply(first, base="HoloV", n_vis=64, restore=True)
        expected_first = prefill_logits(first, ids, img)
        restore.apply(second, base="DivPrune", n_vis=128, restore=False)
        expected_second = prefill_logits(second, ids, img)
        assert expected_first.shape[1] != expected_second.shape[1]
        assert torch.equal(prefill_logits(first, ids, img), expected_first)
        assert restore.settings_of(first).base == "HoloV" and restore.settings_of(second).base == "DivPrune"
    finally:
        restore.remove(first)


def test_eager_equals_sdpa(small_checkpoint, small_model, prompts):
    eager = load_model(small_checkpoint, device="cpu", dtype="float32", attn_implementation="eager")[1]
    sdpa = small_model.model
    ids, img = prompts[1]
    try:
        for m in (eager, sdpa):
            restore.apply(m, base="HoloV", n_vis=64, restore=True)
        a, sa = generate(eager, ids, img, n=3)
        b, sb = generate(sdpa, ids, img, n=3)
        assert torch.equal(a, b)
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-4)
    finally:
        restore.remove(sdpa)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs(small_checkpoint, model, prompts, dtype):
    m = load_model(small_checkpoint, device="cpu", dtype=str(dtype).split(".")[1])[1]
    ids, img = prompts[0]
    restore.apply(m, base="HoloV", n_vis=64, restore=True)
    logits = prefill_logits(m, ids, img.to(dtype))
    assert logits.shape[1] == ids.shape[1] - 1 + 64 and torch.isfinite(logits).all()
    restore.apply(model, base="HoloV", n_vis=64, restore=True)
    reference = prefill_logits(model, ids, img)[0, -1]
    # half precision may flip near-tied selections (measured: cosine 0.96 bf16, 0.86 fp16 on this random
    # model); a broken mask or position path would leave no resemblance
    assert torch.cosine_similarity(logits[0, -1].float(), reference, dim=0) > 0.75


@pytest.mark.parametrize("kwargs,message", [
    (dict(base="HoloV", n_vis=0), "n_vis must be an integer in 1..576"),
    (dict(base="HoloV", n_vis=577), "n_vis must be an integer in 1..576"),
    (dict(base="HoloV", n_vis=64.0), "n_vis must be an integer"),
    (dict(base="HoloV", n_vis=1, restore=True), "n_vis >= 2"),
    (dict(base="NoSuchMethod", n_vis=64), "unknown selector 'NoSuchMethod'; available: DivPrune, FastV, FlowCut, HoloV"),
    (dict(base=None, restore=True), "needs a base method"),
    (dict(base=None, n_vis=64), "needs a base method"),
])
def test_bad_settings(model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        restore.apply(model, **kwargs)
    assert not restore.is_applied(model)


@pytest.mark.parametrize("base", ["FastV", "PDrop", "SparseVLM"])
def test_in_llm_methods_are_refused_until_their_mechanism_lands(model, base):
    with pytest.raises(NotImplementedError, match=f"{base} acts inside the LLM"):
        restore.apply(model, base=base, n_vis=64, restore=True)
    assert not restore.is_applied(model)


def test_not_a_llava_model():
    with pytest.raises(TypeError, match="expects a llava LlavaLlamaForCausalLM"):
        restore.apply(torch.nn.Linear(2, 2), base="HoloV", n_vis=64)
