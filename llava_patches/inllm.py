"""Reducing visual tokens inside LLaVA's LLM (FastV, PDrop, SparseVLM, each with or without RESTORE).

A method acting in the LLM (``tokenreduction.inllm``) names its stages: at decoder layer ``score_layer`` its
tokens are scored from that layer's attention on its own input, and from decoder layer ``layer`` on every
image has ``budget`` tokens. This module is the one mechanism all of them share:

* the prompt is assembled with every visual token (positions 0..N-1, size 1), and the layers before the
  first cut run exactly as stock LLaVA, keeping a full-length KV cache;
* at a score layer the attention rows the method reads (the last prompt token's, or every token after the
  image) are computed from the layer's own query and key projections, RoPE and mask, so SDPA stays the
  attention of every layer and no layer is switched to eager;
* at a cut layer each image is cut on its own (``restore.inllm``: the method's choice, or RESTORE's keep +
  merge), the hidden states are rebuilt and re-padded, and that layer and every later one get the new
  layout's position ids and masks (calibrated by the accumulated group sizes with RESTORE); their KV cache
  holds the reduced sequence, so decoding needs no cache surgery;
* a decoding step gives each layer the positions and mask of the layout it cached: the full layout's before
  the first cut, the stage's after it.

:class:`InLLMDecoderLayerMixin` goes on every ``LlamaDecoderLayer``; ``CalibratedLlamaModelMixin``
(llava_patches/patch.py) starts an :class:`InLLMRun` at each prefill. docs/inllm_methods.md has the picture
of which layer sees which tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import tokenreduction as tr
from restore.attention import calibrated_decode_masks, calibrated_prefill_masks, decode_bias, prefill_bias
from restore.inllm import ImageTrack, StageLayout, apply_choice, image_spans, rebuild_sequence, stage_choice, start_track
from restore.settings import ReductionSettings
from tokenreduction.inllm import InLLMMethod, Stage, StageView, check_stages

from .assembly import SequenceLayout


@dataclass
class StageRecord:
    """What one cut did, for token maps and analysis: each image's track right after it."""

    stage: Stage
    tracks: List[ImageTrack]
    tokens: List[int]  # sequence length of every sample after the cut (padding excluded)


@dataclass
class InLLMRun:
    """One prompt's trip through the LLM's stages (a prefill, then its decoding steps)."""

    method: InLLMMethod
    settings: ReductionSettings
    stages: List[Stage]
    layouts: List[StageLayout]  # layouts[k]: what layers see after k cuts (layouts[0]: the full prompt)
    tracks: List[ImageTrack]
    spans: List[torch.Tensor]  # every image's current visual token indices in layouts[-1]
    head_dim: int
    rope_base: float
    max_position: int  # bound of every position id of the prompt (no device read needed)
    prefilling: bool = True
    generated: int = 0  # tokens decoded so far (set by the LLM before every decoding step)
    input_hidden: Optional[torch.Tensor] = None  # [B, L0, D] entering layer 0, when the method reads it
    full_spans: List[torch.Tensor] = field(default_factory=list)
    pending: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    masks: Dict[Tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    records: List[StageRecord] = field(default_factory=list)

    # ---- which layer sees what --------------------------------------------------------------------
    def layout_index(self, layer: int) -> int:
        """How many cuts the input of decoder ``layer`` has been through."""
        return sum(1 for s in self.stages if s.layer <= layer)

    def finish_prefill(self) -> None:
        """Drop what only the prefill needed; decoding steps follow."""
        self.prefilling = False
        self.masks.clear()
        self.pending.clear()
        self.input_hidden = None

    def layer_inputs(self, layer: int, q_len: int, dtype: torch.dtype) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(additive mask, position ids) of a layer after the first cut; None before it (stock inputs)."""
        k = self.layout_index(layer)
        if k == 0:
            return None
        layout = self.layouts[k]
        if self.prefilling:
            return self._mask(k, dtype), layout.positions
        return self._mask(k, dtype, q_len), layout.decode_positions(self.generated, q_len)

    def _mask(self, k: int, dtype: torch.dtype, q_len: int = 0) -> torch.Tensor:
        key = (k, self.generated if q_len else -1, q_len)
        if key not in self.masks:
            if q_len:  # a new decoding step: the previous step's masks are done with
                self.masks = {m: v for m, v in self.masks.items() if m[2] == 0 or m[1] == self.generated}
            self.masks[key] = self._build_mask(self.layouts[k], k > 0 and self.settings.calibrates, dtype, q_len)
        return self.masks[key]

    def _build_mask(self, layout: StageLayout, calibrated: bool, dtype: torch.dtype, q_len: int) -> torch.Tensor:
        s = self.settings
        if q_len == 0:  # prefill: [B, 1, L, L]
            if calibrated:
                # Real group sizes in every reduced layer: the cut layer is not the LLM's first (see the docs).
                return calibrated_prefill_masks(
                    layout.positions, layout.sizes, layout.is_visual, layout.valid, num_patches=s.num_patches,
                    n_vis=s.n_vis, dtype=dtype, head_dim=self.head_dim, rope_base=self.rope_base,
                    max_position=self.max_position, use_distance=s.uses_distance, c=s.calibration_c,
                    uniform_first_layer=False)[1]
            zeros = layout.sizes.new_zeros(layout.sizes.shape)
            L = layout.length
            no_distance = torch.zeros(layout.positions.shape[0], L, L, dtype=dtype, device=zeros.device)
            return prefill_bias(layout.positions, zeros, layout.valid, dtype, dist=no_distance)
        new = layout.valid.new_ones(layout.valid.shape[0], self.generated + q_len)
        key_valid = torch.cat([layout.valid, new], dim=1)
        if calibrated:
            return calibrated_decode_masks(layout.sizes, layout.is_visual, key_valid, num_patches=s.num_patches,
                                           n_vis=s.n_vis, dtype=dtype, q_len=q_len, uniform_first_layer=False)[1]
        return decode_bias(key_valid.new_zeros(key_valid.shape, dtype=torch.float32), key_valid, dtype, q_len=q_len)

    # ---- scoring ----------------------------------------------------------------------------------
    def score(self, stage_index: int, layer: torch.nn.Module, hidden: torch.Tensor) -> None:
        """The attention rows stage ``stage_index`` is scored with, from decoder ``layer``'s input ``hidden``
        (after every cut made so far: that is what the layer sees)."""
        k = len(self.records)
        layout = self.layouts[k]
        rows, row_valid = self._query_rows(layout)
        weights = attention_rows(layer, hidden, rows, layout.positions, self._mask(k, hidden.dtype))  # [B, R, L]
        self.pending[stage_index] = [(weights[b][row_valid[b]], rows[b][row_valid[b]]) for b in range(hidden.shape[0])]

    def enter_layer(self, index: int, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """A prefill reaching decoder ``index``: its cuts, then the scores later cuts read from this layer."""
        if index == 0 and self.method.needs_input_hidden:
            self.input_hidden = hidden
        for i, stage in enumerate(self.stages):
            if stage.layer == index:
                if stage.score_layer == index:  # scored on the input it is about to cut (PDrop)
                    self.score(i, layer, hidden)
                hidden = self.cut(i, hidden)
        for i, stage in enumerate(self.stages):
            if stage.score_layer == index < stage.layer:  # scored here, cut at a later layer (FastV, SparseVLM)
                self.score(i, layer, hidden)
        return hidden

    def _query_rows(self, layout: StageLayout) -> Tuple[torch.Tensor, torch.Tensor]:
        """[B, R] sequence indices of the query rows (padded with a valid index) and [B, R] bool validity."""
        B, L = layout.valid.shape
        device = layout.valid.device
        last = torch.where(layout.valid, torch.arange(L, device=device), -1).max(dim=1).values  # [B]
        if self.method.query_rows == "last":
            return last.unsqueeze(1), torch.ones(B, 1, dtype=torch.bool, device=device)
        # every token after the sample's last visual token (SparseVLM's text rows)
        index = torch.arange(L, device=device)
        visual_end = torch.where(layout.is_visual & layout.valid, index, -1).max(dim=1).values
        after = (index.unsqueeze(0) > visual_end.unsqueeze(1)) & layout.valid
        counts = after.sum(dim=1)
        R = max(int(counts.max()), 1)
        rows = torch.zeros(B, R, dtype=torch.long, device=device)
        row_valid = torch.zeros(B, R, dtype=torch.bool, device=device)
        for b in range(B):
            found = after[b].nonzero().flatten()
            rows[b, :found.shape[0]] = found
            rows[b, found.shape[0]:] = last[b]
            row_valid[b, :found.shape[0]] = True
        return rows, row_valid

    # ---- cutting ----------------------------------------------------------------------------------
    def cut(self, stage_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Cut every image to the stage's budget; the new hidden states [B, L', D]."""
        stage = self.stages[stage_index]
        layout = self.layouts[-1]
        pending = self.pending.pop(stage_index)
        plain = self.settings.is_plain_base or self.settings.anchors == "none"
        placement = self.method.plain_merged_placement if plain else "by_position"
        new_tokens, new_tracks = [], []
        for image, (track, span) in enumerate(zip(self.tracks, self.spans)):
            b = track.sample
            offset = int(layout.valid[b].long().argmax())  # valid tokens are contiguous (left or right padding)
            length = int(layout.valid[b].sum())
            weights, rows = pending[b]
            view = StageView(
                attention=weights[:, offset:offset + length].float(), query_index=rows - offset,
                visual_index=span - offset, hidden=hidden[b, offset:offset + length], sizes=track.sizes,
                stage=stage_index, budget=stage.budget, n_vis=self.settings.n_vis)
            if self.method.needs_input_hidden:
                full = self.layouts[0]
                start = int(full.valid[b].long().argmax())
                view.input_hidden = self.input_hidden[b, start:start + int(full.valid[b].sum())]
                view.input_visual_index = self.full_spans[image] - start
            choice = stage_choice(self.method, view, self.settings)
            tokens, new_track = apply_choice(track, choice, hidden[b, span], self.settings.merged_position,
                                             placement=placement)
            new_tokens.append(tokens)
            new_tracks.append(new_track)
        hidden, new_layout, spans = rebuild_sequence(hidden, layout, self.spans, new_tokens, new_tracks,
                                                     reindex=not self.settings.retains_positions)
        self.layouts.append(new_layout)
        self.tracks, self.spans = new_tracks, spans
        self.records.append(StageRecord(stage, new_tracks, new_layout.valid.sum(dim=1).tolist()))
        return hidden


def attention_rows(layer: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """[B, R, L] attention of the query ``rows`` [B, R] over all L keys in decoder ``layer`` on its input
    ``hidden`` [B, L, D], mean over heads.

    As the eager attention forms its weights: RoPE at ``positions``, scaled dot products plus the layer's
    additive ``mask`` rows, softmax in float32 cast back to the activations' dtype, then the mean over heads
    in that dtype (as FastV's and PDrop's official code average them). Only the R query rows are projected.
    """
    attn = layer.self_attn
    B, L, _ = hidden.shape
    R = rows.shape[1]
    normed = layer.input_layernorm(hidden)
    picked = normed.gather(1, rows.unsqueeze(-1).expand(-1, -1, normed.shape[-1]))
    q = attn.q_proj(picked).view(B, R, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(B, L, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
    cos, sin = attn.rotary_emb(k, seq_len=L)
    q = apply_rotary_pos_emb(q, q, cos, sin, positions.gather(1, rows))[0]
    k = apply_rotary_pos_emb(k, k, cos, sin, positions)[0]
    k = repeat_kv(k, attn.num_key_value_groups)
    logits = q @ k.transpose(2, 3) / math.sqrt(attn.head_dim)
    logits = logits + mask.gather(2, rows[:, None, :, None].expand(-1, 1, -1, L))
    weights = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return weights.mean(dim=1)


def start_run(settings: ReductionSettings, layout: SequenceLayout, *, num_layers: int, head_dim: int,
              rope_base: float, padding_side: str) -> InLLMRun:
    """The run of one prefill over an assembled ``layout`` whose images carry all their N tokens."""
    method = tr.llm_method(settings.base)
    N = settings.num_patches
    stages = method.stages(settings.n_vis, N, num_layers)
    check_stages(method.name, stages, N, num_layers)
    for previous, stage in zip(stages, stages[1:]):
        if stage.score_layer < previous.layer:
            raise ValueError(f"{method.name}: stage {stage} is scored before the previous cut at layer {previous.layer}")
    full = StageLayout(layout.positions, layout.sizes, layout.is_visual, layout.valid, layout.next_position, padding_side)
    tracks = []
    for b in range(layout.positions.shape[0]):
        visual = (layout.is_visual[b] & layout.valid[b]).nonzero().flatten()
        for start in range(0, visual.shape[0], N):  # each image's N tokens are contiguous, images in order
            tracks.append(start_track(b, layout.positions[b, visual[start:start + N]]))
    spans = image_spans(full, tracks)
    return InLLMRun(method, settings, stages, [full], tracks, spans, head_dim=head_dim, rope_base=rope_base,
                    max_position=layout.max_next, full_spans=list(spans))


class InLLMDecoderLayerMixin:
    """On each ``LlamaDecoderLayer``: score, cut, and give the layer its layout's positions and mask."""

    _restore_ctx: "object"

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        run: Optional[InLLMRun] = getattr(self._restore_ctx, "run", None)
        if run is None:
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        index = self.self_attn.layer_idx
        if run.prefilling:
            hidden_states = run.enter_layer(index, self, hidden_states)
        inputs = run.layer_inputs(index, hidden_states.shape[1], hidden_states.dtype)
        if inputs is not None:
            attention_mask, position_ids = inputs
        return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
