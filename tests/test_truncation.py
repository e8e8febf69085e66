"""Prompts longer than tokenizer_model_max_length: cut as stock LLaVA cuts them, with a consistent layout."""
import pytest
import torch

import restore
from llava_patches.assembly import ImageTokens, assemble


@pytest.fixture
def model(model):
    try:
        yield model
    finally:
        model.config.tokenizer_model_max_length = 2048


@pytest.fixture
def prompt(small_model, make_inputs, synthetic_image):
    tok, _, proc = small_model
    return make_inputs(tok, proc, "Describe the picture in detail, please.", synthetic_image(3, (420, 300)),
                       model_config=small_model.model.config)


def forward(model, ids, img):
    with torch.inference_mode():
        return model(input_ids=ids, images=img).logits


def greedy(model, ids, img, n=4):
    with torch.inference_mode():
        return model.generate(ids, images=img, max_new_tokens=n, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=0)


def test_full_budget_truncates_like_stock(model, prompt):
    # At n_vis = N in patch order the reduced path is stock LLaVA; with a limit that cuts into the
    # image both must cut the same tokens and generate the same continuation.
    ids, img = prompt
    model.config.tokenizer_model_max_length = 300
    stock_logits, stock_tokens = forward(model, ids, img), greedy(model, ids, img)
    assert stock_logits.shape[1] == 300
    restore.apply(model, base="VisPruner", n_vis=576)
    torch.testing.assert_close(forward(model, ids, img), stock_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(model, ids, img), stock_tokens)


@pytest.mark.parametrize("use_restore", [False, True])
def test_truncated_prefix_equals_untruncated_run(model, prompt, use_restore):
    # Attention is causal and the calibration bias depends only on the keys' positions and sizes, so
    # a cut sequence must give exactly the logits of the uncut one on the tokens it keeps.
    ids, img = prompt
    restore.apply(model, base="HoloV", n_vis=64, restore=use_restore)
    full, full_tokens = forward(model, ids, img), greedy(model, ids, img)
    limit = 35 + 40  # inside the 64 visual tokens
    model.config.tokenizer_model_max_length = limit
    cut = forward(model, ids, img)
    assert cut.shape[1] == limit < full.shape[1]
    torch.testing.assert_close(cut, full[:, :limit], rtol=1e-5, atol=1e-5)
    assert greedy(model, ids, img).shape == full_tokens.shape  # every rerun used to crash here


def test_layout_is_cut_with_the_sequence():
    embed = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, -200, 3, 4, 5]])
    image = ImageTokens(features=torch.randn(3, 4), positions=torch.tensor([0, 4, 7]), sizes=torch.tensor([2., 3., 4.]))
    _, _, _, layout = assemble(embed, ids, None, None, [image], num_patches=9, retain_positions=True, max_length=4)
    # text 1, 2 at 0, 1; the image spans slots 2..10 and its kept tokens sit at 2, 6, 9; cut after 4 tokens
    assert layout.positions.tolist() == [[0, 1, 2, 6]]
    assert layout.sizes.tolist() == [[1., 1., 2., 3.]]
    assert layout.is_visual.tolist() == [[False, False, True, True]]
    assert layout.next_position.tolist() == [7] and layout.max_next == 7
    _, _, _, uncut = assemble(embed, ids, None, None, [image], num_patches=9, retain_positions=True)
    assert uncut.positions.tolist() == [[0, 1, 2, 6, 9, 11, 12, 13]] and uncut.max_next == 14
