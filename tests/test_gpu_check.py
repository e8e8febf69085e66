"""restore.gpu_check: the skip without CUDA, and the same comparison on the CPU on the small checkpoint."""
import pytest
import torch

from restore import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_default_run_skips_without_cuda(capsys):
    assert gpu_check.main([]) == 0
    assert "SKIPPED, no CUDA device" in capsys.readouterr().out


def test_cpu_fp16_equals_stock_builder_bit_for_bit(small_checkpoint, capsys):
    """fp16 on the CPU: our loader and LLaVA's builder must give identical tokens and logits (tolerance 0)."""
    with pytest.warns(UserWarning, match="float16 on the CPU"):
        status = gpu_check.main(["--device", "cpu", "--dtype", "float16", "--shapes", "small", "--new-tokens", "3",
                                 "--small-checkpoint", str(small_checkpoint)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "tolerance 0.0" in out and out.count("tokens equal; logits max |diff| 0, max relative 0") == 2
    assert "SDPA masks ['torch.bool']" in out and "SDPA masks ['torch.float16']" in out
    assert out.count("batch of 8 vs one at a time:") == 5  # counted, as information, in fp16
    assert "gpu_check: PASSED" in out


def test_batches_of_eight_answer_as_one_at_a_time_in_fp32(small_model, capsys):
    lines = gpu_check.batch_agreement("small", tuple(small_model), torch.device("cpu"), torch.float32, 4)
    assert [ok for ok, _ in lines] == [True] * 5, lines  # stock, HoloV + RESTORE and the three in-LLM methods
    assert all("0 of 8 answers differ" in line for _, line in lines)


def test_comparison_reports_the_first_differing_token():
    scores = torch.zeros(1, 3, 4)
    other = scores.clone()
    other[0, 2, 1] = 0.5
    result = gpu_check.compare_generations("x", (torch.tensor([[1, 2, 3]]), scores), (torch.tensor([[1, 2, 0]]), other))
    assert not result.tokens_equal and result.first_difference == 2 and result.max_abs == 0.5
    assert not result.passed(1.0) and "DIFFER" in result.line(1.0)


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "13b"], "unknown"),
    (["--device", "mps"], "--device must be cuda or cpu"),
    (["--new-tokens", "0"], ">= 1"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
    assert message in capsys.readouterr().err
