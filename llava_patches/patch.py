"""The mixins ``restore.apply`` puts on a LLaVA model's modules (instance-level class swaps, as ToMe does).

Nothing in transformers or llava is edited globally; two models in one process can carry different
settings, and :func:`restore.remove` puts the original classes back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

from restore.attention import calibrated_decode_masks, calibrated_prefill_masks
from restore.reduce import ReducedImages, arrange_merged_tokens, reduce_visual_tokens
from restore.settings import ReductionSettings

from .assembly import ImageTokens, SequenceLayout, assemble, split_images
from .next_layout import is_next, split_views
from .next_reduce import reduce_next_images
from .vision import encode_visual_tokens


@dataclass
class RestoreContext:
    """State shared by the patched modules of one model (never by two models)."""

    settings: ReductionSettings
    layout: Optional[SequenceLayout] = None  # of the current prompt, kept for its decoding steps
    masks: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (first layer, later layers), one forward
    rope_length: int = 0
    padding_side: Optional[str] = None  # overrides the config's while generating
    run: Optional[Any] = None  # an in-LLM method's llava_patches.inllm.InLLMRun for the current prompt


def _cache_length(past_key_values) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    return int(past_key_values[0][0].shape[-2]) if len(past_key_values) else 0


def reduce_images(model, pixels: torch.Tensor, settings: ReductionSettings) -> ReducedImages:
    """The visual tokens of ``pixels`` [I, 3, H, W] after the reduction, wherever the base method acts."""
    llm = model.get_model()
    if settings.acts == "llm":  # the LLM cuts them: every token enters it, one patch each, at its own position
        features = model.encode_images(pixels)  # stock LLaVA's own path
        B, N = features.shape[:2]
        patches = torch.arange(N, device=features.device).expand(B, N)
        return ReducedImages(features, patches, torch.ones(B, N, device=features.device), patches.clone())
    if settings.merges_itself:  # ToMe, FlowCut: reduced inside CLIP, n_vis tokens leave the select layer
        from .encoder_reduce import encode_in_encoder, encoder_method

        merged = encode_in_encoder(llm.get_vision_tower(), pixels, encoder_method(settings), settings.n_vis)
        return arrange_merged_tokens(llm.mm_projector(merged.features), merged.sizes, merged.source, settings)
    import tokenreduction as tr

    needs = tr.method_needs(settings.base, plain=settings.is_plain_base)
    tokens = encode_visual_tokens(model, pixels, with_keys="keys" in needs, with_cls="cls_raw_feature" in needs)
    return reduce_visual_tokens(tokens, settings, project=llm.mm_projector)


class ReducedLlavaMixin:
    """On ``LlavaLlamaForCausalLM``: reduce the visual tokens while the prompt is assembled."""

    _restore_ctx: RestoreContext

    def generate(self, inputs=None, images=None, image_sizes=None, **kwargs):
        # Generation reads the logits of the last position, so a batch must be padded on the left
        # whatever the tokenizer's side (stock LLaVA pads on the config's side and breaks batches).
        self._restore_ctx.padding_side = "left"
        try:
            return super().generate(inputs, images=images, image_sizes=image_sizes, **kwargs)
        finally:
            self._restore_ctx.padding_side = None

    def prepare_inputs_labels_for_multimodal(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None
    ):
        if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            return super().prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes
            )
        settings = self._restore_ctx.settings
        model = self.get_model()
        if labels is not None and settings.acts == "llm":
            raise ValueError(f"{settings.base} cuts tokens inside the LLM, so its logits no longer line up with "
                             "labels; compute a loss with a method acting before the LLM, or without labels")
        if is_next(self.config):  # every image in the fixed 2880-token layout (llava_patches/next_layout.py)
            pixels = split_views(images)
            reduced = reduce_next_images(self, pixels, settings)
        else:
            pixels = split_images(images)
            reduced = reduce_images(self, pixels, settings)
        per_image = [ImageTokens(reduced.features[i], reduced.positions[i], reduced.sizes[i]) for i in range(pixels.shape[0])]
        embeds, attention_mask, labels, layout = assemble(
            model.embed_tokens, input_ids, attention_mask, labels, per_image,
            num_patches=settings.num_patches,
            retain_positions=settings.retains_positions,
            padding_side=self._restore_ctx.padding_side or getattr(self.config, "tokenizer_padding_side", "right"),
            max_length=getattr(self.config, "tokenizer_model_max_length", None),
        )
        self._restore_ctx.layout = layout
        return None, (None if position_ids is None else layout.positions), attention_mask, past_key_values, embeds, labels


class CalibratedLlamaModelMixin:
    """On the LLM (``LlavaLlamaModel``): retained position ids and, with RESTORE, calibrated attention masks."""

    _restore_ctx: RestoreContext

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, **kwargs):
        ctx = self._restore_ctx
        batch, q_len = (inputs_embeds if inputs_embeds is not None else input_ids).shape[:2]
        past = _cache_length(past_key_values)
        layout = ctx.layout
        if past == 0:  # a new prompt: only a layout assembled for exactly this prefill applies
            rows = layout.positions.shape[0] if layout is not None else 0
            if layout is not None and layout.fresh and layout.length == q_len and rows and batch % rows == 0:
                ctx.layout = layout = layout.repeat_samples(batch // rows) if batch != rows else layout
                layout.fresh = False
            else:
                ctx.layout = layout = None
        if layout is None:
            ctx.rope_length = 0
            ctx.run = None
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs)

        position_ids = layout.positions if past == 0 else layout.decode_positions(past, q_len)
        ctx.rope_length = layout.rope_length(past, q_len)
        if ctx.settings.acts == "llm":
            return self._forward_in_llm(layout, past, q_len, input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, past_key_values=past_key_values,
                                        inputs_embeds=inputs_embeds, **kwargs)
        if ctx.settings.calibrates:
            ctx.masks = self._restore_masks(layout, attention_mask, past, q_len)
        elif self._sdpa_reads_the_mask(kwargs.get("output_attentions")):
            # The official model gives SDPA an explicit boolean causal mask here, never is_causal: on a
            # GPU the two select different kernels, so the mask object itself must match.
            mask = boolean_causal_mask(_key_valid(layout, attention_mask, past + q_len), q_len)
            ctx.masks = (mask, mask)
        try:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs)
        finally:
            ctx.masks = None

    def _forward_in_llm(self, layout: SequenceLayout, past: int, q_len: int, **inputs):
        # The layers before the first cut run as stock LLaVA on the full prompt; the decoder layers'
        # mixin (llava_patches/inllm.py) cuts and gives later layers their own positions and masks.
        from .inllm import start_run

        ctx = self._restore_ctx
        if past == 0:
            ctx.run = start_run(ctx.settings, layout, num_layers=len(self.layers),
                                head_dim=self.config.hidden_size // self.config.num_attention_heads,
                                rope_base=getattr(self.config, "rope_theta", 10000.0),
                                padding_side=ctx.padding_side or getattr(self.config, "tokenizer_padding_side", "right"))
        elif ctx.run is None:
            raise RuntimeError("a decoding step without the prefill that started it")
        else:
            ctx.run.generated = past - layout.length
        try:
            return super().forward(**inputs)
        finally:
            ctx.run.finish_prefill()

    def _restore_masks(self, layout: SequenceLayout, attention_mask, past: int, q_len: int):
        settings = self._restore_ctx.settings
        dtype = self.embed_tokens.weight.dtype
        # Without merging every size is 1: the first layer's uniform size would only shift text against images.
        common = dict(num_patches=settings.num_patches, n_vis=settings.n_vis, dtype=dtype,
                      uniform_first_layer=settings.merges)
        if past == 0:
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            return calibrated_prefill_masks(layout.positions, layout.sizes, layout.is_visual, layout.valid,
                                            head_dim=head_dim, rope_base=getattr(self.config, "rope_theta", 10000.0),
                                            max_position=layout.max_next, use_distance=settings.uses_distance,
                                            c=settings.calibration_c, **common)
        valid = _key_valid(layout, attention_mask, past + q_len)
        return calibrated_decode_masks(layout.sizes, layout.is_visual, valid, q_len=q_len, **common)

    def _sdpa_reads_the_mask(self, output_attentions: Optional[bool]) -> bool:
        # Asked for attention weights, transformers' SDPA layers fall back to eager, which adds the mask.
        wants_weights = self.config.output_attentions if output_attentions is None else output_attentions
        return self.config._attn_implementation == "sdpa" and not wants_weights


def _key_valid(layout: SequenceLayout, attention_mask: Optional[torch.Tensor], total: int) -> torch.Tensor:
    """[B, total] bool: which keys of a forward over ``total`` cached + new tokens are not padding."""
    if total == layout.length:
        return layout.valid
    if attention_mask is None:  # a hand-written decoding loop: the prompt's padding, then new tokens
        return torch.cat([layout.valid, layout.valid.new_ones(layout.valid.shape[0], total - layout.length)], dim=1)
    return attention_mask[:, -total:].bool()


def boolean_causal_mask(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """[B, 1, q_len, K] bool for the last ``q_len`` of K tokens: True where a query may attend.

    Without padding this is the official base-only mask, ``ones(q_len, K).tril(K - q_len)``. Each query
    also keeps its own key, so that a padding row is never empty (SDPA would return NaN for it).
    """
    K = key_valid.shape[1]
    keys = torch.arange(K, device=key_valid.device)
    queries = keys[K - q_len:].unsqueeze(1)
    allowed = (keys.unsqueeze(0) <= queries) & key_valid.unsqueeze(1)
    return (allowed | (keys.unsqueeze(0) == queries)).unsqueeze(1)


class CalibratedAttentionMixin:
    """On each decoder layer's self-attention: use the mask RESTORE built for this layer."""

    _restore_ctx: RestoreContext

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        masks = self._restore_ctx.masks
        if masks is not None:
            attention_mask = masks[0] if self.layer_idx == 0 else masks[1]
        return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)


class RetainedRopeMixin:
    """On each rotary embedding: cos/sin as the official RESTORE model computes them, for every position
    up to the largest retained one (retained positions skip ahead of the key length)."""

    _restore_ctx: RestoreContext

    def forward(self, x, seq_len=None):
        return official_rope_tables(self.inv_freq, max(seq_len or 0, self._restore_ctx.rope_length), x)


def official_rope_tables(inv_freq: torch.Tensor, length: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [length, head_dim] for positions 0..length-1, in ``like``'s dtype and on its device.

    The official model recomputes cos/sin at every call: positions times frequencies in float32 on
    the frequencies' device (the model's), cast to the activations' dtype only at the end. Stock
    LLaVA's table instead holds CPU-computed values; on a GPU the two differ in the last bit.
    Indexing this table with the position ids gives exactly the official per-position values.
    """
    frequencies = inv_freq.float()
    positions = torch.arange(length, device=frequencies.device, dtype=frequencies.dtype)
    angles = torch.outer(positions, frequencies)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(device=like.device, dtype=like.dtype), angles.sin().to(device=like.device, dtype=like.dtype)
