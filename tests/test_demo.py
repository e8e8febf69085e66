"""The README's demo runs on the small checkpoint and prints the comparison table."""
from restore import demo


def test_demo_prints_stages_for_each_method(small_checkpoint, capsys):
    assert demo.main(["--checkpoint", str(small_checkpoint), "--max-new-tokens", "2", "--n_vis", "32"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    assert "576 -> 32" in out
    for label in ("stock LLaVA", "HoloV only", "HoloV + RESTORE"):
        assert f"[{label}]" in out
