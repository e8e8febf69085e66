"""Token reduction inside LLaVA's CLIP encoder: one mechanism for every method that acts there.

A method inside the vision encoder (ToMe merges between attention and MLP; FlowCut prunes after the
MLP, in stages) changes the token sequence as CLIP runs, so that ``n_vis`` patch tokens (and CLS) reach
LLaVA's select layer. What the methods share lives here:

* The patch. The class of each ``CLIPEncoderLayer`` instance up to the select layer is swapped for a
  subclass whose forward is the stock one with the method's hooks (:class:`EncoderMethod`) at fixed
  points: an additive attention bias, after the attention (+ residual), after the MLP (+ residual).
  Forward hooks on the layer's ``k_proj`` and ``v_proj`` hand the method the keys and values the layer
  computes itself (no second projection). Removal puts the stock classes back and drops the hooks and
  attributes, so the tower behaves exactly as before. Library classes are never edited.
* The state of one forward (:class:`EncoderRun`, reset by layer 0): sizes (how many original tokens
  each token stands for), the assignment of every original token to its current token (-1: dropped),
  the select layer's CLS attention when asked for, and the method's own per-forward state.
* :func:`encode_in_encoder`: run the tower up to the select layer with a method, returning features,
  sizes and the source map (patch -> token) that RESTORE's retained positions and size calibration
  read; ``restore.reduce.arrange_merged_tokens`` orders them for the LLM.

Methods: :class:`llava_patches.tome.ToMeInEncoder`, :class:`FlowCutInEncoder` (below, on the pure
functions of ``tokenreduction.flowcut``); :func:`encoder_method` builds the one a configuration names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Type

import torch

from tokenreduction.flowcut import (accumulate_scores, flowcut_scores, flowcut_stages, head_mean_values,
                                    semantic_attention, stage_keep_count, top_tokens)

from .vision import _layer_indices

__all__ = ["EncodedTokens", "EncoderRun", "EncoderMethod", "FlowCutInEncoder", "apply_encoder_method",
           "remove_encoder_method", "applied_method", "encode_in_encoder", "encoder_method",
           "register_encoder_method", "check_encoder_budget"]

_ORIGINAL_CLASS = "_encoder_reduce_original_class"
_ATTRIBUTES = ("_encoder_reduce_run", "_encoder_reduce_index", "_encoder_reduce_hooks")
_SUBCLASSES: Dict[Type, Type] = {}


class EncodedTokens(NamedTuple):
    """What :func:`encode_in_encoder` returns for B images (N0 = 576 patches for LLaVA-1.5).

    features:      [B, n_vis, C] select-layer patch features (CLS dropped), in the images' dtype, in the
                   order the method leaves them.
    sizes:         [B, n_vis] float32, original patches each token stands for.
    source:        [B, N0] long, index 0..n_vis-1 of the token each patch (row-major) ended up in, -1 for
                   a patch the method dropped (FlowCut without RESTORE).
    cls_attention: [B, n_vis] float32, the select layer's CLS->token attention averaged over heads (for
                   ToMe summed over what that layer merges after it); None when the select layer is the
                   embedding output.
    """

    features: torch.Tensor
    sizes: torch.Tensor
    source: torch.Tensor
    cls_attention: Optional[torch.Tensor]


@dataclass
class EncoderRun:
    """State shared by the patched layers of one tower; layer 0 resets it at every forward.

    ``size`` [B, T] float32 and ``assignment`` [B, 1 + N0] long (the current token of every original
    token, CLS at index 0, -1 for dropped ones) are over the whole sequence, None while nothing changed;
    ``cls_attention`` [B, T] float32 once ``attention_layer`` ran; ``state`` is the method's own.
    """

    method: "EncoderMethod"
    n_vis: int
    num_layers: int
    num_heads: int
    attention_layer: int = -1
    size: Optional[torch.Tensor] = None
    assignment: Optional[torch.Tensor] = None
    cls_attention: Optional[torch.Tensor] = None
    state: Dict[str, Any] = field(default_factory=dict)
    capturing: bool = False
    captured: Dict[str, torch.Tensor] = field(default_factory=dict)

    def start(self, hidden_states: torch.Tensor) -> None:
        self.size = self.assignment = self.cls_attention = None
        self.state = {}
        self.captured = {}
        self.method.start(self, hidden_states)

    def keep_tokens(self, index: torch.Tensor, length: int) -> None:
        """Record that the sequence of ``length`` tokens became ``index`` [B, T'] (the positions kept, CLS
        first): sizes follow, the tokens left out are dropped."""
        if self.size is not None:
            self.size = self.size.gather(1, index)
        slots = torch.arange(index.shape[1], device=index.device).expand_as(index)
        self.remap(index.new_full((index.shape[0], length), -1).scatter(1, index, slots))

    def remap(self, new_index: torch.Tensor) -> None:
        """Every current token i is now token ``new_index[:, i]`` (-1: dropped)."""
        if self.assignment is None:
            self.assignment = new_index.clone()
            return
        moved = new_index.gather(1, self.assignment.clamp(min=0))
        self.assignment = moved.masked_fill(self.assignment < 0, -1)


class EncoderMethod:
    """How one method reduces tokens inside CLIP; every hook defaults to doing nothing (stock CLIP).

    ``captures``: projections the method reads ("keys", "values"), as the layer computes them.
    ``per_image``: :func:`encode_in_encoder` runs each image on its own (the method's token counts depend
    on the image, so a batch would otherwise share one count).
    """

    name = ""
    captures: Tuple[str, ...] = ()
    per_image = False

    def check(self, num_patches: int, n_vis: int, num_layers: int) -> None:
        """ValueError when ``num_layers`` layers cannot take ``num_patches`` to ``n_vis``."""

    def start(self, run: EncoderRun, hidden_states: torch.Tensor) -> None:
        """A new forward on ``hidden_states`` [B, 1 + N0, C] (CLS first)."""

    def wants_attention(self, run: EncoderRun, index: int, hidden_states: torch.Tensor) -> bool:
        return False

    def attention_bias(self, run: EncoderRun, index: int, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        """Added to the attention logits ([B, 1, T, T]), or None."""
        return None

    def after_attention(self, run: EncoderRun, index: int, hidden_states: torch.Tensor,
                        attention: Optional[torch.Tensor], captured: Dict[str, torch.Tensor]) -> torch.Tensor:
        return hidden_states

    def after_layer(self, run: EncoderRun, index: int, hidden_states: torch.Tensor,
                    attention: Optional[torch.Tensor], captured: Dict[str, torch.Tensor]) -> torch.Tensor:
        return hidden_states


class ReducingEncoderLayerMixin:
    """CLIPEncoderLayer whose forward is the stock one with the applied method's hooks."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        causal_attention_mask: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = False,
    ):
        run: EncoderRun = self._encoder_reduce_run
        index: int = self._encoder_reduce_index
        method = run.method
        if index == 0:
            run.start(hidden_states)

        bias = method.attention_bias(run, index, hidden_states)
        if bias is not None and attention_mask is not None:
            bias = attention_mask + bias
        elif bias is None:
            bias = attention_mask
        capture_cls = index == run.attention_layer
        wants = bool(output_attentions) or capture_cls or method.wants_attention(run, index, hidden_states)

        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        run.capturing, run.captured = True, {}
        try:
            hidden_states, attn_weights = self.self_attn(
                hidden_states=hidden_states,
                attention_mask=bias,
                causal_attention_mask=causal_attention_mask,
                output_attentions=wants,
            )
        finally:
            run.capturing = False
        captured, run.captured = run.captured, {}
        hidden_states = residual + hidden_states
        if capture_cls:
            run.cls_attention = attn_weights[:, :, 0, :].mean(dim=1).float()
        hidden_states = method.after_attention(run, index, hidden_states, attn_weights, captured)

        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        hidden_states = method.after_layer(run, index, hidden_states, attn_weights, captured)

        outputs = (hidden_states,)
        if output_attentions:
            outputs += (attn_weights,)  # over the tokens this layer's attention saw
        return outputs


def _subclass(cls: Type) -> Type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Reducing{cls.__name__}", (ReducingEncoderLayerMixin, cls), {})
    return _SUBCLASSES[cls]


def _encoder_layers(vision_tower) -> torch.nn.ModuleList:
    return vision_tower.vision_tower.vision_model.encoder.layers


def applied_run(vision_tower) -> Optional[EncoderRun]:
    """The run state of the method applied to the tower, None on a stock tower."""
    for layer in _encoder_layers(vision_tower):
        if _ORIGINAL_CLASS in layer.__dict__:
            return layer._encoder_reduce_run
    return None


def applied_method(vision_tower) -> Optional[EncoderMethod]:
    run = applied_run(vision_tower)
    return None if run is None else run.method


def apply_encoder_method(vision_tower, method: EncoderMethod, n_vis: int) -> EncoderRun:
    """Patch the layers of LLaVA's ``CLIPVisionTower`` up to its select layer so that every forward
    (LLaVA's own included) reduces to ``n_vis`` patch tokens there with ``method``; returns the shared run
    state. On a patched tower only the method and ``n_vis`` change. Undo with :func:`remove_encoder_method`."""
    run = applied_run(vision_tower)
    if run is not None:
        run.method, run.n_vis = method, n_vis
        return run
    layers = _encoder_layers(vision_tower)
    hidden_index, _ = _layer_indices(vision_tower.select_layer, len(layers))
    run = EncoderRun(method=method, n_vis=n_vis, num_layers=hidden_index, num_heads=layers[0].self_attn.num_heads)

    def recorder(name: str) -> Callable:
        def record(module, inputs, output):
            if run.capturing and name in run.method.captures:
                run.captured[name] = output
        return record

    for index in range(hidden_index):
        layer = layers[index]
        hooks = (layer.self_attn.k_proj.register_forward_hook(recorder("keys")),
                 layer.self_attn.v_proj.register_forward_hook(recorder("values")))
        layer.__dict__[_ORIGINAL_CLASS] = layer.__class__
        layer.__class__ = _subclass(layer.__class__)
        layer._encoder_reduce_run = run
        layer._encoder_reduce_index = index
        layer._encoder_reduce_hooks = hooks
    return run


def remove_encoder_method(vision_tower):
    """Give the tower back its stock layers (classes, no hooks, no attributes of this module)."""
    for layer in _encoder_layers(vision_tower):
        original = layer.__dict__.pop(_ORIGINAL_CLASS, None)
        if original is None:
            continue
        layer.__class__ = original
        for hook in layer.__dict__.pop("_encoder_reduce_hooks", ()):
            hook.remove()
        for name in _ATTRIBUTES:
            layer.__dict__.pop(name, None)
    return vision_tower


def _tower_shape(vision_tower) -> Tuple[int, int, int]:
    """(layers run up to the select layer, index of the select layer's attention, patches per image)."""
    layers = _encoder_layers(vision_tower)
    hidden_index, attention_index = _layer_indices(vision_tower.select_layer, len(layers))
    config = vision_tower.config
    return hidden_index, attention_index, (config.image_size // config.patch_size) ** 2


@torch.no_grad()
def encode_in_encoder(vision_tower, images: torch.Tensor, method: EncoderMethod, n_vis: int) -> EncodedTokens:
    """Run LLaVA's ``CLIPVisionTower`` on ``images`` [B, 3, H, W] with ``method`` up to the select layer only
    (later layers are not run), ``n_vis`` patch tokens coming out. n_vis = N0 (576) gives the stock
    select-layer features exactly. A tower that already carries a method keeps it afterwards; this call
    uses ``method`` and ``n_vis`` for its own forward only."""
    if getattr(vision_tower, "select_feature", "patch") != "patch":
        raise NotImplementedError(f"{method.name} needs mm_vision_select_feature='patch'")
    hidden_index, attention_index, num_patches = _tower_shape(vision_tower)
    if hidden_index > 0 and attention_index != hidden_index - 1:
        raise NotImplementedError(
            f"select_layer {vision_tower.select_layer}: its attention is not inside the last layer run"
        )
    method.check(num_patches, n_vis, hidden_index)  # fail before running anything
    if method.per_image and images.shape[0] > 1:
        parts = [encode_in_encoder(vision_tower, images[i:i + 1], method, n_vis) for i in range(images.shape[0])]
        return EncodedTokens(*(None if part[0] is None else torch.cat(part) for part in zip(*parts)))

    clip = vision_tower.vision_tower.vision_model
    layers = clip.encoder.layers
    hidden = clip.embeddings(images.to(device=vision_tower.device, dtype=vision_tower.dtype))
    hidden = clip.pre_layrnorm(hidden)
    batch = hidden.shape[0]
    patched_here = applied_run(vision_tower) is None
    run = apply_encoder_method(vision_tower, method, n_vis)
    saved = (run.method, run.n_vis, run.attention_layer)
    run.method, run.n_vis, run.attention_layer = method, n_vis, attention_index
    try:
        for index in range(hidden_index):
            hidden = layers[index](hidden, None, None, output_attentions=False)[0]
    finally:
        run.method, run.n_vis, run.attention_layer = saved
        if patched_here:
            remove_encoder_method(vision_tower)

    features = hidden[:, 1:].to(images.dtype)
    device = hidden.device
    tokens = features.shape[1]
    sizes = (torch.ones(batch, tokens, dtype=torch.float32, device=device) if run.size is None
             else run.size[:, 1:].float())
    if run.assignment is None:
        source = torch.arange(num_patches, device=device).expand(batch, -1).clone()
    else:
        patches = run.assignment[:, 1:]  # CLS never moves from index 0 and absorbs nothing
        source = torch.where(patches < 0, torch.full_like(patches, -1), patches - 1)
    cls_attention = None if run.cls_attention is None or hidden_index == 0 else run.cls_attention[:, 1:]
    run.size = run.assignment = run.cls_attention = None
    run.state = {}
    return EncodedTokens(features=features, sizes=sizes, source=source, cls_attention=cls_attention)


# --------------------------------------------------------------------------------------------------
# FlowCut


class FlowCutInEncoder(EncoderMethod):
    """FlowCut's stages (``tokenreduction.flowcut``) after the MLP of its layers, with RESTORE optionally.

    ``gamma`` < 1 with ``anchors`` ('distinctive' or 'uniform'): at every stage that keeps k patches, the
    top int(gamma * k) by FlowCut's running score stay as they are and the other patches of that layer
    are merged into the remaining k - int(gamma * k) tokens around anchors (``restore.merge.anchor_merge``
    on the layer's hidden states). A merged token's hidden state and running score are the size-weighted
    means of its members'; sizes add up over the stages; every token sits at the lower median of the
    original patches it stands for, and the sequence is kept in that order (CLS first). ``gamma`` = 1 is
    FlowCut's own pruning. Without merging, the tokens stay in FlowCut's ascending order.
    """

    name = "FlowCut"
    captures = ("values",)
    per_image = True

    def __init__(self, gamma: float = 1.0, anchors: str = "none") -> None:
        if anchors == "none" and gamma != 1.0:
            raise ValueError("FlowCut with gamma < 1 needs anchors ('distinctive' or 'uniform') to merge around")
        self.gamma = float(gamma)
        self.anchors = anchors

    @property
    def merges(self) -> bool:
        return self.anchors != "none" and self.gamma < 1.0

    def check(self, num_patches: int, n_vis: int, num_layers: int) -> None:
        if not 0 < n_vis <= num_patches:
            raise ValueError(f"n_vis must be in [1, {num_patches}], got {n_vis}")
        if n_vis < num_patches and not flowcut_stages(num_layers):
            raise ValueError(f"FlowCut needs at least 2 CLIP layers before the select layer to prune "
                             f"(its last stage is the layer before it), got {num_layers}")

    def start(self, run: EncoderRun, hidden_states: torch.Tensor) -> None:
        run.state.update(stages=flowcut_stages(run.num_layers), running=None)

    def wants_attention(self, run: EncoderRun, index: int, hidden_states: torch.Tensor) -> bool:
        return hidden_states.shape[1] - 1 > run.n_vis

    def after_layer(self, run: EncoderRun, index: int, hidden_states: torch.Tensor,
                    attention: Optional[torch.Tensor], captured: Dict[str, torch.Tensor]) -> torch.Tensor:
        t = hidden_states.shape[1] - 1
        if t <= run.n_vis:
            return hidden_states
        values = head_mean_values(captured["values"], run.num_heads)  # [B, H, T, d]
        cls_attention = attention[:, :, 0, 1:].mean(dim=1)
        scores = flowcut_scores(cls_attention, semantic_attention(values)[:, 1:], values.mean(dim=1)[:, 1:])
        running = accumulate_scores(run.state["running"], scores)
        remaining = run.state["stages"].get(index)
        if remaining is not None:
            n_keep = stage_keep_count(cls_attention, remaining, run.n_vis)
            if n_keep < t:
                if self.merges:
                    hidden_states, running = self._keep_and_merge(run, hidden_states, running, n_keep)
                else:
                    hidden_states, running = self._prune(run, hidden_states, running, n_keep)
        run.state["running"] = running
        return hidden_states

    @staticmethod
    def _prune(run: EncoderRun, hidden_states: torch.Tensor, running: torch.Tensor, n_keep: int):
        keep = top_tokens(running, n_keep)
        sequence = torch.cat([keep.new_zeros(keep.shape[0], 1), keep + 1], dim=1)
        run.keep_tokens(sequence, hidden_states.shape[1])
        hidden = hidden_states.gather(1, sequence.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
        return hidden, running.gather(1, keep)

    def _keep_and_merge(self, run: EncoderRun, hidden_states: torch.Tensor, running: torch.Tensor, k: int):
        from restore.merge import anchor_merge, complement, group_medians

        B, T, C = hidden_states.shape
        t = T - 1
        device = hidden_states.device
        n_keep = int(self.gamma * k)
        n_groups = k - n_keep
        keep = top_tokens(running, n_keep) if n_keep else torch.empty(B, 0, dtype=torch.long, device=device)
        rest = complement(keep, t)
        patches = hidden_states[:, 1:]
        size = (torch.ones(B, T, dtype=torch.float32, device=device) if run.size is None else run.size)[:, 1:]

        def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1])) if x.dim() == 3 else x.gather(1, index)

        groups = anchor_merge(take(patches, rest), n_groups, anchor_rule=self.anchors)
        # size-weighted means of the members (in float32 for half-precision states, as ToMe's merge)
        work = torch.float32 if hidden_states.dtype in (torch.float16, torch.bfloat16) else hidden_states.dtype
        weight = take(size, rest).to(work).unsqueeze(-1)  # [B, M, 1]
        members = torch.nn.functional.one_hot(groups.group_of, n_groups).to(work).transpose(1, 2)  # [B, K, M]
        total = members @ weight  # [B, K, 1]
        merged = (members @ (take(patches, rest).to(work) * weight)) / total
        merged_running = (members @ (take(running, rest).to(work).unsqueeze(-1) * weight)) / total

        new_patches = torch.cat([take(patches, keep), merged.to(hidden_states.dtype)], dim=1)  # [B, k, C]
        new_running = torch.cat([take(running, keep), merged_running[..., 0].to(running.dtype)], dim=1)
        new_size = torch.cat([take(size, keep), total[..., 0].float()], dim=1)
        slot = torch.empty(B, t, dtype=torch.long, device=device)
        slot.scatter_(1, keep, torch.arange(n_keep, device=device).expand(B, n_keep))
        slot.scatter_(1, rest, n_keep + groups.group_of)
        # sequence map: CLS stays 0, patch j goes to 1 + slot[j]
        run.remap(torch.cat([slot.new_zeros(B, 1), slot + 1], dim=1))

        # order the k tokens by their retained position (the lower median of their original patches)
        original = run.assignment[:, 1:] - 1  # [B, N0], -1 (and below) for dropped patches
        absent = original < 0
        n0 = original.shape[1]
        positions = group_medians(torch.arange(n0, device=device).expand(B, n0),
                                  original.masked_fill(absent, k), k + 1, span=n0)[:, :k]
        order = positions.sort(dim=-1, stable=True).indices
        inverse = order.argsort(dim=-1)
        run.remap(torch.cat([slot.new_zeros(B, 1), inverse + 1], dim=1))
        run.size = torch.cat([torch.ones(B, 1, dtype=torch.float32, device=device), take(new_size, order)], dim=1)
        hidden = torch.cat([hidden_states[:, :1], take(new_patches, order)], dim=1)
        return hidden, take(new_running, order)


# --------------------------------------------------------------------------------------------------
# Which method a configuration runs


_FACTORIES: Dict[str, Callable[[Any], EncoderMethod]] = {}


def register_encoder_method(name: str, factory: Callable[[Any], EncoderMethod]) -> None:
    """``factory(settings)`` builds the :class:`EncoderMethod` of a method registered with
    ``tokenreduction.register_method(name, acts="vision_encoder")`` for a ``ReductionSettings``."""
    _FACTORIES[name.lower()] = factory


def _flowcut(settings) -> FlowCutInEncoder:
    if settings.merges:
        return FlowCutInEncoder(gamma=settings.prune_ratio, anchors=settings.anchors)
    return FlowCutInEncoder()


def _tome(settings) -> EncoderMethod:
    from .tome import ToMeInEncoder

    return ToMeInEncoder()


register_encoder_method("FlowCut", _flowcut)
register_encoder_method("ToMe", _tome)


def encoder_method(settings) -> EncoderMethod:
    """The method a configuration inside the vision encoder runs (ValueError for one without a mechanism)."""
    factory = _FACTORIES.get(settings.base.lower())
    if factory is None:
        raise ValueError(f"{settings.base} acts inside the vision encoder but has no encoder mechanism here; "
                         "register one with llava_patches.encoder_reduce.register_encoder_method")
    return factory(settings)


def check_encoder_budget(model_path: str, method: EncoderMethod, n_vis: int) -> None:
    """ValueError, before any weight is loaded, when a checkpoint's CLIP tower cannot carry ``method`` to
    ``n_vis`` tokens at its select layer. Reads the checkpoint's config and, for a local tower, the
    tower's; a hub tower (CLIP ViT-L, 23 layers before LLaVA's select layer) reaches every budget."""
    import os

    from restore.jsonio import read_json

    config_file = os.path.join(os.path.expanduser(model_path), "config.json")
    if not os.path.isfile(config_file):
        return
    config = read_json(config_file)
    tower_config = os.path.join(str(config.get("mm_vision_tower", "")), "config.json")
    if not os.path.isfile(tower_config):
        return
    tower = read_json(tower_config)
    tower = tower.get("vision_config", tower)
    layers = int(tower["num_hidden_layers"])
    hidden_index, _ = _layer_indices(int(config.get("mm_vision_select_layer", -2)), layers)
    patches = (int(tower["image_size"]) // int(tower["patch_size"])) ** 2
    try:
        method.check(patches, n_vis, hidden_index)
    except ValueError as e:
        raise ValueError(f"{e} (the CLIP tower of {model_path} runs {hidden_index} layers before LLaVA's select "
                         "layer; a larger n_vis or a deeper tower is needed, e.g. the small checkpoint built with "
                         "--vision-layers 6)") from None
