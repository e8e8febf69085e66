"""Methods that reduce visual tokens inside the LLM (FastV, PDrop, SparseVLM): what such a method declares.

A method acting in the LLM names its stages (at which decoder layer the visual tokens are cut, to how many
per image, and from which layer's attention they are scored) and how it scores and chooses the tokens of
one image at one stage. The reduction mechanism (``llava_patches/inllm.py`` for LLaVA) does the rest:
it computes the attention rows the method asks for from that layer's own queries and keys, removes or
merges the tokens in the hidden states, the position ids, the masks and the KV cache of later layers,
and, with RESTORE, keeps ``gamma * budget`` tokens by the method's score and merges the others.

Torch only; no model code. A method is one module in this package calling :func:`register_llm_method`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

QUERY_ROWS = ("last", "text_after_image")
REFERENCE_DEPTH = 32  # decoder layers of LLaVA-1.5-7B's LLM, the depth the methods' layer schedules are set for
# Where the plain row puts the merged tokens of a StageChoice among the image's tokens: by the mechanism's
# own position rule, or right after the kept tokens (which stay in sequence order), in group order.
MERGED_PLACEMENTS = ("by_position", "after_kept")


@dataclass(frozen=True)
class Stage:
    """One cut: from decoder layer ``layer`` on, every image has ``budget`` visual tokens."""

    layer: int  # the first decoder layer that sees the reduced tokens (its input is reduced)
    budget: int  # visual tokens per image from ``layer`` on
    score_layer: int  # the decoder layer whose attention, on its own input, scores the tokens (<= layer)


@dataclass
class StageView:
    """What a method sees of one image at one stage (one sample of the batch, its L tokens; no padding)."""

    attention: torch.Tensor  # [R, L] float32: softmax attention of the query rows at score_layer, mean over heads
    query_index: torch.Tensor  # [R] sequence index of each query row
    visual_index: torch.Tensor  # [n] sequence index of each of the image's current visual tokens, ascending
    hidden: torch.Tensor  # [L, D] hidden states entering the stage's layer
    sizes: torch.Tensor  # [n] float32: original patches each visual token stands for
    stage: int  # 0 for the first cut
    budget: int  # visual tokens this image keeps after the cut
    # Optional, filled when the method asks for them (InLLMMethod.needs_input_hidden / always for n_vis):
    input_hidden: Optional[torch.Tensor] = None  # [L0, D] the sample's hidden states entering decoder layer 0 (uncut)
    input_visual_index: Optional[torch.Tensor] = None  # [N] sequence index of the image's tokens in input_hidden
    n_vis: Optional[int] = None  # the requested budget (what stages() was called with)

    @property
    def visual_attention(self) -> torch.Tensor:
        """[R, n]: the query rows' attention to the image's visual tokens."""
        return self.attention[:, self.visual_index]


@dataclass
class StageChoice:
    """How one image's n visual tokens become ``budget``: kept tokens and merged groups (the rest is dropped)."""

    keep: torch.Tensor  # [k] indices into the n tokens, kept as they are
    merged_members: Optional[torch.Tensor] = None  # [m] indices into the n tokens merged into new tokens
    group_of: Optional[torch.Tensor] = None  # [m] group (0..g-1) of each merged member
    n_groups: int = 0
    merged_features: Optional[torch.Tensor] = None  # [g, D] the method's own merged features; None: size-weighted mean


class InLLMMethod:
    """Base class of a method acting inside the LLM. Subclasses set ``name`` and implement :meth:`stages`
    and :meth:`scores`; :meth:`plain_choice` defaults to keeping the ``budget`` highest-scoring tokens."""

    name: str = ""
    query_rows: str = "last"  # which attention rows scores() reads: the last prompt token, or every text token after the image
    plain_positions: str = "retained"  # position ids of the plain row: retained (original ids) or reindexed
    plain_merged_placement: str = "by_position"  # one of MERGED_PLACEMENTS
    needs_input_hidden: bool = False  # scores()/plain_choice() read StageView.input_hidden / input_visual_index

    def stages(self, n_vis: int, num_patches: int, num_layers: int) -> List[Stage]:
        raise NotImplementedError

    def scores(self, view: StageView) -> torch.Tensor:
        """[n] importance of the image's visual tokens (higher is kept first)."""
        raise NotImplementedError

    def plain_choice(self, view: StageView) -> StageChoice:
        """The method's own cut (its baseline row): by default the ``view.budget`` highest scores."""
        return StageChoice(keep=self.scores(view).topk(view.budget).indices)


_METHODS: Dict[str, InLLMMethod] = {}


def register_llm_method(method: InLLMMethod) -> InLLMMethod:
    """Register ``method`` (an :class:`InLLMMethod` instance) under ``method.name`` as acting in the LLM."""
    from .registry import register_method

    if method.query_rows not in QUERY_ROWS:
        raise ValueError(f"{method.name}: query_rows must be one of {QUERY_ROWS}, got {method.query_rows!r}")
    if method.plain_merged_placement not in MERGED_PLACEMENTS:
        raise ValueError(f"{method.name}: plain_merged_placement must be one of {MERGED_PLACEMENTS}, "
                         f"got {method.plain_merged_placement!r}")
    register_method(method.name, acts="llm")
    _METHODS[method.name.lower()] = method
    return method


def llm_method(name: str) -> InLLMMethod:
    """The registered in-LLM method called ``name`` (case-insensitive)."""
    from .registry import canonical_name

    key = canonical_name(name).lower()
    if key not in _METHODS:
        raise ValueError(f"{canonical_name(name)} does not act inside the LLM")
    return _METHODS[key]


def fit_layers(layers: Sequence[int], num_layers: int) -> List[int]:
    """Cut layers set for a :data:`REFERENCE_DEPTH`-layer LLM, on an LLM of ``num_layers`` layers.

    They stay as they are when they fit (every layer below ``num_layers``); on a shallower LLM (the small
    test checkpoints) each is scaled with the depth and then moved up just enough to keep the cuts strictly
    increasing inside 1..num_layers - 1.
    """
    layers = list(layers)
    if all(layer < num_layers for layer in layers):
        return layers
    if len(layers) > num_layers - 1:
        raise ValueError(f"{len(layers)} cuts need an LLM of at least {len(layers) + 1} layers, this one has {num_layers}")
    fitted: List[int] = []
    for i, layer in enumerate(layers):
        scaled = round(layer * num_layers / REFERENCE_DEPTH)
        highest = num_layers - (len(layers) - i)  # leave room for the cuts after this one
        fitted.append(min(max(scaled, fitted[-1] + 1 if fitted else 1), highest))
    return fitted


def check_stages(name: str, stages: Sequence[Stage], num_patches: int, num_layers: int) -> None:
    """ValueError unless the stages cut at increasing layers inside the LLM to non-increasing budgets."""
    previous_layer, previous_budget = -1, num_patches
    for s in stages:
        if not (0 < s.layer < num_layers and 0 <= s.score_layer <= s.layer and s.layer > previous_layer):
            raise ValueError(f"{name}: stage {s} must cut at increasing layers in 1..{num_layers - 1}, "
                             "scored at or before that layer")
        if not 1 <= s.budget <= previous_budget:
            raise ValueError(f"{name}: stage {s} must keep 1..{previous_budget} tokens per image")
        previous_layer, previous_budget = s.layer, s.budget
