"""M-RoPE decay (Appendix A): D = sum_g w_g D_g(delta_g) against values computed by hand."""
import math

import pytest
import torch

from restore.attention import (mrope_axis_decay, mrope_axis_weights, mrope_decay, mrope_distance_bias, rope_decay)

QWEN_SECTION = [16, 24, 24]  # Qwen2.5-VL-7B: head dim 128, rope theta 1e6


def test_weights_are_twice_the_section_share_of_head_dim():
    assert mrope_axis_weights(QWEN_SECTION, 128) == [0.25, 0.375, 0.375]
    assert mrope_axis_weights([1, 1, 2], 8) == [0.25, 0.25, 0.5]


def test_tiny_head_by_hand():
    # head dim 8, base 10^4: theta = 1, 0.1, 0.01, 0.001; section [1, 1, 2]: t -> theta_0, h -> theta_1,
    # w -> theta_2 and theta_3. Weights 2*1/8, 2*1/8, 2*2/8.
    cases = {
        (0, 0, 0): 1.0,
        (1, 0, 0): 0.25 * math.cos(1.0) + 0.25 + 0.5,
        (0, 3, 0): 0.25 + 0.25 * math.cos(0.3) + 0.5,
        (0, 0, 100): 0.25 + 0.25 + 0.5 * (math.cos(1.0) + math.cos(0.1)) / 2,
        (2, 5, 7): 0.25 * math.cos(2.0) + 0.25 * math.cos(0.5) + 0.5 * (math.cos(0.07) + math.cos(0.007)) / 2,
    }
    deltas = torch.tensor(list(cases))
    got = mrope_decay(deltas, [1, 1, 2], head_dim=8, rope_base=10000.0)
    assert got.tolist() == pytest.approx(list(cases.values()), abs=1e-6)


def qwen_by_hand(dt, dh, dw):
    """The mean over the 64 frequencies of cos(delta_axis(j) * theta_j), frequency by frequency."""
    total = 0.0
    for j in range(64):
        theta = 1e6 ** (-2 * j / 128)
        delta = dt if j < 16 else dh if j < 40 else dw
        total += math.cos(delta * theta)
    return total / 64


@pytest.mark.parametrize("delta", [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 3, 5), (0, -4, 2), (7, 2, 9),
                                   (40, 0, 0), (0, 13, 13)])
def test_qwen_section_matches_frequency_by_frequency(delta):
    got = mrope_decay(torch.tensor([delta]), QWEN_SECTION, head_dim=128, rope_base=1e6)
    assert got.item() == pytest.approx(qwen_by_hand(*delta), abs=1e-6)


def test_per_axis_decays_by_hand():
    # D_t(1): the temporal section is theta_0..theta_15 of 1e6^(-2j/128).
    expect = sum(math.cos(1e6 ** (-2 * j / 128)) for j in range(16)) / 16
    assert mrope_axis_decay(torch.tensor([1]), 0, QWEN_SECTION, 128, 1e6).item() == pytest.approx(expect, abs=1e-6)
    expect = sum(math.cos(3 * 1e6 ** (-2 * j / 128)) for j in range(40, 64)) / 24
    assert mrope_axis_decay(torch.tensor([3]), 2, QWEN_SECTION, 128, 1e6).item() == pytest.approx(expect, abs=1e-6)


def test_equal_axis_deltas_are_one_dimensional_rope():
    # Text tokens have t = h = w: their M-RoPE decay is the 1-D RoPE decay.
    d = torch.arange(0, 50)
    got = mrope_decay(torch.stack([d, d, d], dim=-1), QWEN_SECTION, 128, 1e6)
    torch.testing.assert_close(got, rope_decay(d, 128, 1e6), atol=1e-6, rtol=0)


def test_distance_bias_matrix():
    # Two text tokens, a 2x2 image at t = 2, a text token after it: positions [3, B=1, L=7].
    t = [0, 1, 2, 2, 2, 2, 4]
    h = [0, 1, 2, 2, 3, 3, 4]
    w = [0, 1, 2, 3, 2, 3, 4]
    positions = torch.tensor([t, h, w]).unsqueeze(1)
    bias = mrope_distance_bias(positions, torch.float32, QWEN_SECTION, 128, 1e6)
    assert bias.shape == (1, 7, 7)
    for i in range(7):
        for j in range(7):
            expect = math.log(2.0 - qwen_by_hand(t[i] - t[j], h[i] - h[j], w[i] - w[j]))
            assert bias[0, i, j].item() == pytest.approx(expect, abs=1e-5)
    assert torch.all(bias.diagonal(dim1=-2, dim2=-1) == 0)  # log(2 - 1)


def test_bad_sections_are_refused():
    with pytest.raises(ValueError, match="head_dim / 2"):
        mrope_decay(torch.zeros(1, 3), [16, 24, 16], head_dim=128)
    with pytest.raises(ValueError, match="one entry per M-RoPE axis"):
        mrope_decay(torch.zeros(1, 2), QWEN_SECTION, head_dim=128)
    with pytest.raises(ValueError, match="positions must be"):
        mrope_distance_bias(torch.zeros(2, 1, 4, dtype=torch.long), torch.float32, QWEN_SECTION)
