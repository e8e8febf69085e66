"""Adding a selector is one decorated function; names are case-insensitive."""
from __future__ import annotations

import pytest
import torch

import tokenreduction as tr
from tokenreduction import registry


def isolate_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the registry at copies of its tables; undoing ``monkeypatch`` brings the real ones back."""
    monkeypatch.setattr(registry, "_SELECTORS", dict(registry._SELECTORS))
    monkeypatch.setattr(registry, "_NAMES", dict(registry._NAMES))


@pytest.fixture
def scratch_registry(monkeypatch):
    """Selectors registered inside a test disappear after it."""
    isolate_registry(monkeypatch)


def test_builtins_are_available():
    assert {"DivPrune", "HoloV", "VisPruner"} <= set(tr.available_selectors())


@pytest.mark.parametrize("spelling", ["HoloV", "holov", "HOLOV", "hOlOv"])
def test_names_are_case_insensitive(spelling):
    assert tr.get_selector(spelling) is tr.get_selector("HoloV")
    assert tr.canonical_name(spelling) == "HoloV"


def test_a_new_selector_in_a_few_lines(scratch_registry):
    @tr.register_selector("TopAttention")
    def top_attention(tokens, n_keep):
        tokens.require("TopAttention", "cls_attention")
        return tokens.cls_attention.topk(n_keep, dim=-1).indices

    attention = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3], [0.8, 0.1, 0.6, 0.2, 0.7]])
    tokens = tr.VisualTokens(features=torch.randn(2, 5, 4), cls_attention=attention)
    keep = tr.get_selector("topattention")(tokens, 2)
    assert keep.tolist() == [[3, 1], [0, 4]]
    assert keep.dtype == torch.long
    assert "TopAttention" in tr.available_selectors()
    assert tr.available_selectors() == sorted(tr.available_selectors(), key=str.lower)
    # The registry's checks apply to the new selector as well.
    with pytest.raises(ValueError, match=r"TopAttention: n_keep must be an integer in 1\.\.5"):
        tr.get_selector("TopAttention")(tokens, 6)
    with pytest.raises(ValueError, match="TopAttention needs VisualTokens.cls_attention"):
        tr.get_selector("TopAttention")(tr.VisualTokens(features=torch.randn(1, 5, 4)), 2)


def test_a_name_cannot_be_taken_twice(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):

        @tr.register_selector("holov")
        def another(tokens, n_keep):
            return torch.zeros(tokens.batch_size, n_keep, dtype=torch.long)


def test_wrong_output_shape_is_reported(scratch_registry):
    @tr.register_selector("Broken")
    def broken(tokens, n_keep):
        return torch.zeros(tokens.batch_size, n_keep + 1, dtype=torch.long)

    with pytest.raises(RuntimeError, match=r"Broken returned shape \(1, 4\), expected \(1, 3\)"):
        tr.get_selector("Broken")(tr.VisualTokens(features=torch.randn(1, 5, 4)), 3)


@pytest.mark.parametrize("bad", [[[0, 0, 1]], [[0, 1, 5]], [[-1, 0, 1]]])
def test_repeated_or_out_of_range_indices_are_reported(scratch_registry, bad):
    @tr.register_selector("Careless")
    def careless(tokens, n_keep):
        return torch.tensor(bad)

    with pytest.raises(RuntimeError, match=r"Careless must return 3 distinct indices in 0\.\.4 per sample"):
        tr.get_selector("Careless")(tr.VisualTokens(features=torch.randn(1, 5, 4)), 3)


def test_scratch_registrations_do_not_leak():
    # Self-contained, so that it does not depend on which tests ran before it: the same isolation as
    # the fixture, undone by hand, must leave the real tables exactly as they were.
    real_selectors, real_names = dict(registry._SELECTORS), dict(registry._NAMES)
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate_registry(monkeypatch)

        @tr.register_selector("Temporary")
        def temporary(tokens, n_keep):
            return torch.arange(n_keep).expand(tokens.batch_size, n_keep)

        assert "Temporary" in tr.available_selectors()
        registry._SELECTORS.clear()  # mutating the scratch copy in place must not reach the real table
        registry._NAMES.clear()
    assert registry._SELECTORS == real_selectors and registry._NAMES == real_names
    assert "Temporary" not in tr.available_selectors()
    assert tr.get_selector("holov") is real_selectors["holov"]
