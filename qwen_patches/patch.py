"""The reduction on Qwen2.5-VL: which modules ``restore.apply`` swaps (as for LLaVA, each instance's class is
replaced by mixin + its class; transformers itself is not edited) and what they do.

- ``ReducedQwenModelMixin`` on ``model.model`` (Qwen2_5_VLModel). In a prefill with images it encodes them
  as stock (visual tokens = the encoder's outputs after the patch merger, per image), takes the stock M-RoPE
  ids of the whole prompt (``get_rope_index``), reduces each image on its own with the core
  (``restore.reduce.reduce_visual_tokens``: the base selects, RESTORE merges the rest), and feeds the
  language model the shorter sequence: a kept token keeps its (t, h, w) ids, a merged token takes the
  per-axis median of its members' ids, the text after an image keeps its full-sequence ids. Decoding
  continues each sample from its largest id + 1 (stock Qwen's rope_deltas, kept as they are), over a KV
  cache of the reduced length.
- ``CalibratedQwenAttentionMixin`` on each decoder layer's attention: with calibration, the additive
  pre-softmax bias ``log(size_j) + log(c - D(p_i - p_j))`` (D the M-RoPE decay of restore.attention) in
  prefill and ``log(size_j)`` in decoding; the first layer sees every visual token of image k as
  N_k / n_k patches, the later layers the real group sizes (as the LLaVA path).

Budget: ``settings.n_vis`` visual tokens per image, at most the image's own count; or a share of each
image's tokens (``restore.apply(model, base, keep=0.111)``: round(keep * N_k), at least 1, 2 with RESTORE).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, List, Optional

import torch

from restore.attention import decode_bias, mrope_distance_bias, prefill_bias

# Bases whose Qwen2.5-VL importance signal is implemented here (docs/qwen2_5_vl.md has the others').
SUPPORTED_BASES = ("DivPrune", "VisPruner", "HoloV")
# ... and those among them that rank by the encoder's last-block attention (qwen_patches/vision.py).
ATTENTION_BASES = ("VisPruner", "HoloV")


@dataclass
class QwenRestoreContext:
    """State shared by one model's patched modules: the settings and the current generation's reduction."""

    settings: Any
    state: Optional["ReducedPrompt"] = None
    masks: Optional[tuple] = None  # (first layer, later layers) additive masks of the running forward
    last: dict = field(default_factory=dict)  # what the last prefill did (tests, analysis)


@dataclass
class ReducedPrompt:
    """A reduced prefill, what its decoding steps need."""

    orig_len: int  # padded prompt length before reduction
    attention_mask: torch.Tensor  # [B, L'] the reduced prompt's padding mask
    next_position: torch.Tensor  # [B] the M-RoPE id of each sample's first generated token
    log_sizes: Optional[tuple] = None  # ([B, L'], [B, L']) first / later layers' log sizes (calibration)


def budget_for_image(settings: Any, n_tokens: int) -> int:
    """Visual tokens image k keeps: min(n_vis, N_k), or round(keep * N_k) for a share (``settings.keep``; at
    least 1, 2 with merging, so that one is selected and one merged)."""
    if settings.keep is not None:
        n = int(round(settings.keep * n_tokens))
    else:
        n = settings.n_vis
    lowest = 2 if settings.merges and n_tokens >= 2 else 1
    return max(lowest, min(n, n_tokens))


def group_axis_medians(axis_positions: torch.Tensor, source: torch.Tensor, n_out: int) -> torch.Tensor:
    """Per-axis lower-middle median of the members of each output token.

    axis_positions [3, N] (t, h, w ids of the image's tokens), source [N] (the output token each belongs to,
    -1 when dropped) -> [3, n_out]: for each axis on its own, the members' ids sorted, the one at index
    (count - 1) // 2. A kept token (one member) gets its own ids.
    """
    member = source >= 0
    slots = source[member]
    counts = torch.bincount(slots, minlength=n_out)
    if bool((counts == 0).any()):
        raise ValueError("every output token needs at least one member")
    starts = counts.cumsum(0) - counts
    middle = starts + (counts - 1) // 2
    out = []
    for values in axis_positions[:, member]:
        span = int(values.max()) + 1 if values.numel() else 1
        order = (slots * span + values).argsort()
        out.append(values[order][middle])
    return torch.stack(out)


def image_spans(ids: torch.Tensor, image_token_id: int) -> List[slice]:
    """The runs of image pad tokens in one row of input ids, in order."""
    is_image = (ids == image_token_id).int()
    edges = torch.diff(torch.nn.functional.pad(is_image, (1, 1)))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return [slice(s, e) for s, e in zip(starts, ends)]


class ReducedQwenModelMixin:
    """Qwen2_5_VLModel with the visual tokens of each image reduced before the language model."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None,
                video_grid_thw=None, rope_deltas=None, cache_position=None, second_per_grid_ts=None, **kwargs):
        ctx = self._restore_ctx
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        stock = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                     output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                     return_dict=return_dict, pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
                     image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, rope_deltas=rope_deltas,
                     cache_position=cache_position, second_per_grid_ts=second_per_grid_ts, **kwargs)
        if past == 0:
            ctx.state = None
            if pixel_values is None:  # no image: nothing to reduce
                return super().forward(**stock)
            if pixel_values_videos is not None or input_ids is None or inputs_embeds is not None:
                raise ValueError("restore on Qwen2.5-VL reduces images given as input_ids + pixel_values; "
                                 "videos and inputs_embeds are not supported")
            return self._reduced_prefill(input_ids, attention_mask, past_key_values, use_cache, output_attentions,
                                         output_hidden_states, pixel_values, image_grid_thw, kwargs)
        if ctx.state is None:  # decoding after an unreduced prefill: stock
            return super().forward(**stock)
        return self._reduced_decode(input_ids, inputs_embeds, attention_mask, past_key_values, past, use_cache,
                                    output_attentions, output_hidden_states, kwargs)

    # ---- prefill ----------------------------------------------------------------------------------
    def _reduced_prefill(self, input_ids, attention_mask, past_key_values, use_cache, output_attentions,
                         output_hidden_states, pixel_values, image_grid_thw, kwargs):
        import tokenreduction as tr
        from restore.reduce import reduce_visual_tokens

        ctx = self._restore_ctx
        settings = ctx.settings
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.get_input_embeddings()(input_ids)
        if settings.base in ATTENTION_BASES:
            from .vision import encode_with_received_attention

            images, received = encode_with_received_attention(self, pixel_values, image_grid_thw)
        else:
            images, received = self.get_image_features(pixel_values, image_grid_thw), None
        full_positions, _ = self.get_rope_index(input_ids, image_grid_thw, None, attention_mask=attention_mask)
        image_token_id = self.config.image_token_id

        rows = []  # per sample: (features [L_b, D], positions [3, L_b], sizes [L_b], uniform sizes [L_b], visual [L_b])
        image = 0
        record = {"kept": [], "sizes": [], "positions": [], "n_tokens": []}
        for b in range(B):
            valid = attention_mask[b].bool()
            ids, feats, pos = input_ids[b][valid], embeds[b][valid], full_positions[:, b][:, valid]
            parts_f, parts_p, parts_s, parts_u, parts_v = [], [], [], [], []
            cursor = 0
            for span in image_spans(ids, image_token_id):
                text = slice(cursor, span.start)
                parts_f.append(feats[text]); parts_p.append(pos[:, text])
                ones = torch.ones(span.start - cursor, device=feats.device)
                parts_s.append(ones); parts_u.append(ones); parts_v.append(torch.zeros_like(ones, dtype=torch.bool))
                features = images[image].to(feats.dtype)
                n_tokens = features.shape[0]
                if n_tokens != span.stop - span.start:
                    raise ValueError(f"image {image} has {n_tokens} visual tokens for {span.stop - span.start} pads")
                n = budget_for_image(settings, n_tokens)
                per_image = replace(settings, n_vis=n, num_patches=n_tokens, keep=None)
                tokens = tr.VisualTokens(features=features.unsqueeze(0))
                select = None
                if settings.base == "VisPruner":  # its Qwen port: similarity on the post-merger tokens too
                    tokens = tr.VisualTokens(features=features.unsqueeze(0), raw_features=features.unsqueeze(0),
                                             cls_attention=received[image].unsqueeze(0).to(features.dtype))
                elif settings.base == "HoloV":  # its Qwen port: the mean over the queries (4 N_k patches)
                    from .holov import qwen_holov

                    mean = received[image] / (self.visual.spatial_merge_unit * n_tokens)
                    tokens = tr.VisualTokens(features=features.unsqueeze(0), cls_attention=mean.unsqueeze(0).to(features.dtype))
                    select = qwen_holov
                reduced = reduce_visual_tokens(tokens, per_image, select=select)
                order = reduced.positions[0].argsort(stable=True)  # sequence (raster) order, as the peers' ports
                slot_of_order = order.argsort()
                source = reduced.source[0]
                source = torch.where(source >= 0, slot_of_order[source.clamp(min=0)], source)
                parts_f.append(reduced.features[0][order])
                parts_p.append(group_axis_medians(pos[:, span], source, n))
                sizes = reduced.sizes[0][order]
                parts_s.append(sizes)
                parts_u.append(torch.full_like(sizes, n_tokens / n))
                parts_v.append(torch.ones(n, dtype=torch.bool, device=feats.device))
                record["kept"].append(source); record["n_tokens"].append(n_tokens)
                record.setdefault("received", []).append(None if received is None else received[image])
                record["sizes"].append(sizes); record["positions"].append(parts_p[-1])
                cursor = span.stop
                image += 1
            rest = slice(cursor, ids.shape[0])
            ones = torch.ones(ids.shape[0] - cursor, device=feats.device)
            parts_f.append(feats[rest]); parts_p.append(pos[:, rest])
            parts_s.append(ones); parts_u.append(ones); parts_v.append(torch.zeros_like(ones, dtype=torch.bool))
            rows.append((torch.cat(parts_f), torch.cat(parts_p, dim=1), torch.cat(parts_s), torch.cat(parts_u),
                         torch.cat(parts_v)))

        # Left-padded, as generation needs: the last column is every sample's last prompt token.
        Lr = max(r[0].shape[0] for r in rows)
        D = embeds.shape[-1]
        new_embeds = embeds.new_zeros(B, Lr, D)
        positions = torch.ones(3, B, Lr, dtype=full_positions.dtype, device=embeds.device)
        sizes = torch.ones(B, Lr, device=embeds.device)
        uniform = torch.ones(B, Lr, device=embeds.device)
        visual = torch.zeros(B, Lr, dtype=torch.bool, device=embeds.device)
        mask = torch.zeros(B, Lr, dtype=attention_mask.dtype, device=embeds.device)
        for b, (f, p, s, u, v) in enumerate(rows):
            n = f.shape[0]
            new_embeds[b, Lr - n:] = f
            positions[:, b, Lr - n:] = p
            sizes[b, Lr - n:], uniform[b, Lr - n:], visual[b, Lr - n:] = s, u, v
            mask[b, Lr - n:] = 1
        next_position = positions.amax(dim=(0, 2)) + 1
        # stock rope_deltas (full-length prompt): generate's own decoding positions stay right
        self.rope_deltas = (next_position - L).unsqueeze(1)
        ctx.last = dict(record, positions_full=full_positions, positions_reduced=positions, attention_mask=mask,
                        sizes_row=sizes, visual=visual)
        state = ReducedPrompt(orig_len=L, attention_mask=mask, next_position=next_position)

        cache_position = torch.arange(Lr, device=embeds.device)
        lm_mask = mask
        if settings.calibrates:
            has_image = visual.any(dim=-1)
            first, later = uniform.log(), sizes.log()
            state.log_sizes = (first, later)
            if settings.calibration == "size_distance":
                text_config = self.language_model.config
                head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
                dist = mrope_distance_bias(positions, new_embeds.dtype, text_config.rope_scaling["mrope_section"],
                                           head_dim, float(text_config.rope_theta), c=settings.calibration_c)
                dist = dist.masked_fill(~has_image[:, None, None], 0.0)  # a text-only prompt runs uncalibrated
            else:
                dist = torch.zeros(B, Lr, Lr, dtype=new_embeds.dtype, device=embeds.device)
            valid = mask.bool()
            masks = tuple(prefill_bias(positions[0], s, valid, new_embeds.dtype, dist=dist) for s in (first, later))
            lm_mask = {"full_attention": masks[1]}
            ctx.masks = masks
            ctx.last["masks"] = masks
        ctx.state = state
        try:
            outputs = self.language_model(input_ids=None, position_ids=positions, attention_mask=lm_mask,
                                          past_key_values=past_key_values, inputs_embeds=new_embeds, use_cache=use_cache,
                                          output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                          return_dict=True, cache_position=cache_position, **kwargs)
        finally:
            ctx.masks = None
        return self._output(outputs)

    # ---- decoding ---------------------------------------------------------------------------------
    def _reduced_decode(self, input_ids, inputs_embeds, attention_mask, past_key_values, past, use_cache,
                        output_attentions, output_hidden_states, kwargs):
        ctx = self._restore_ctx
        state = ctx.state
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        B, q = inputs_embeds.shape[:2]
        generated = past - state.attention_mask.shape[1]  # tokens generated (and cached) so far
        # the generated part of the caller's mask (its prompt part has the unreduced length)
        if attention_mask is None:
            new_part = torch.ones(B, generated + q, dtype=state.attention_mask.dtype, device=inputs_embeds.device)
        else:
            new_part = attention_mask[:, state.orig_len:]
        mask = torch.cat([state.attention_mask, new_part.to(state.attention_mask.dtype)], dim=1)
        steps = torch.arange(generated, generated + q, device=inputs_embeds.device)
        positions = (state.next_position[:, None] + steps[None, :]).unsqueeze(0).expand(3, -1, -1)
        cache_position = past + torch.arange(q, device=inputs_embeds.device)
        lm_mask = mask
        if state.log_sizes is not None:
            valid = mask.bool()
            masks = []
            for log_sizes in state.log_sizes:
                extra = log_sizes.new_zeros(B, mask.shape[1] - log_sizes.shape[1])
                masks.append(decode_bias(torch.cat([log_sizes, extra], dim=1), valid, inputs_embeds.dtype, q_len=q))
            ctx.masks = tuple(masks)
            lm_mask = {"full_attention": masks[1]}
        try:
            outputs = self.language_model(input_ids=None, position_ids=positions, attention_mask=lm_mask,
                                          past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                          use_cache=use_cache, output_attentions=output_attentions,
                                          output_hidden_states=output_hidden_states, return_dict=True,
                                          cache_position=cache_position, **kwargs)
        finally:
            ctx.masks = None
        return self._output(outputs)

    def _output(self, outputs):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModelOutputWithPast

        return Qwen2_5_VLModelOutputWithPast(last_hidden_state=outputs.last_hidden_state,
                                             past_key_values=outputs.past_key_values,
                                             hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                             rope_deltas=self.rope_deltas)


class CalibratedQwenAttentionMixin:
    """A decoder layer's attention with the calibrated mask of the running forward (first layer: uniform sizes)."""

    def forward(self, *args, **kwargs):
        masks = self._restore_ctx.masks
        if masks is not None:
            kwargs["attention_mask"] = masks[0] if self.layer_idx == 0 else masks[1]  # the layer passes kwargs
        return super().forward(*args, **kwargs)
