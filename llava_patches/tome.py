"""ToMe inside LLaVA's CLIP tower, so that exactly ``n_vis`` patch tokens reach the select layer.

Every CLIP encoder layer up to the select layer (23 of 24 for LLaVA-1.5, select layer -2) merges
tokens between its attention and its MLP and uses proportional attention (log token size added
to the attention logits, over keys), as in ToMe. The per-layer reduction is
``tokenreduction.tome.tome_schedule`` (constant r, remainder in the first layers).

The patch is instance-level: the class of each of those ``CLIPEncoderLayer`` instances is swapped
for a subclass, and a forward hook on its ``self_attn.k_proj`` hands the keys to the matching
(no second key projection). ``remove_tome`` restores the classes and drops the hooks, giving stock
behaviour back exactly. Library classes are never edited.

Entry points:
    encode_with_tome(vision_tower, images, n_vis) -> ToMeTokens   # patches for the call only
    apply_tome(vision_tower, n_vis) / remove_tome(vision_tower)      # every forward of the tower
                                                                     # (stock LLaVA included) merges

Token order of the output: the order ToMe leaves tokens in. After each layer's merge, the tokens
at even sequence positions that were not merged (CLS first, then in their previous order) come
first, followed by every token at an odd position (in its previous order). Over 23 layers this is
not spatial order; ``source`` says where each token came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Type

import torch

from tokenreduction.tome import bipartite_soft_matching, merge_assignment, merge_weighted, tome_schedule

from .vision import _layer_indices

__all__ = ["ToMeTokens", "ToMeRun", "encode_with_tome", "apply_tome", "remove_tome", "is_tome_applied"]

_ORIGINAL_CLASS = "_tome_original_class"
_SUBCLASSES: Dict[Type, Type] = {}


class ToMeTokens(NamedTuple):
    """What ``encode_with_tome`` returns for a batch of B images (N0 = 576 patches for LLaVA-1.5).

    features:      [B, n_vis, C] select-layer patch features (CLS dropped), in the images' dtype.
    sizes:         [B, n_vis] float32, original patches each token stands for; rows sum to N0.
    source:        [B, N0] long, index 0..n_vis-1 of the token each patch (row-major) ended up in.
    cls_attention: [B, n_vis] float32, the select layer's CLS->token attention averaged over heads
                   (with proportional attention). That layer merges after its attention, so each
                   value is the attention CLS gave to all the tokens merged into that token there
                   (summed); None when the select layer is the embedding output.
    """

    features: torch.Tensor
    sizes: torch.Tensor
    source: torch.Tensor
    cls_attention: Optional[torch.Tensor]


@dataclass
class ToMeRun:
    """State shared by the patched layers of one tower; reset by layer 0 at every forward.

    After a forward: ``size`` [B, t] float32 and ``assignment`` [B, 1 + N0] long over the whole
    sequence (CLS included, at index 0), None while nothing has been merged;
    ``cls_attention`` [B, t] float32 when ``attention_layer`` was reached.
    """

    n_vis: int
    num_layers: int
    attention_layer: int = -1
    schedule: List[int] = field(default_factory=list)
    size: Optional[torch.Tensor] = None
    assignment: Optional[torch.Tensor] = None
    cls_attention: Optional[torch.Tensor] = None
    capturing_keys: bool = False
    keys: Optional[torch.Tensor] = None

    def start(self, hidden_states: torch.Tensor) -> None:
        self.schedule = tome_schedule(hidden_states.shape[1] - 1, self.n_vis, self.num_layers)
        self.size = None
        self.assignment = None
        self.cls_attention = None
        self.keys = None


class ToMeEncoderLayerMixin:
    """CLIPEncoderLayer with ToMe between attention and MLP, and proportional attention."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        causal_attention_mask: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = False,
    ):
        run: ToMeRun = self._tome_run
        index: int = self._tome_index
        if index == 0:
            run.start(hidden_states)
        batch, tokens, _ = hidden_states.shape

        bias = attention_mask
        if run.size is not None:
            # Proportional attention: a key standing for s patches counts s times in the softmax.
            # CLIP adds ``attention_mask`` to the logits, so the log sizes go in through it. While
            # no token has been merged the sizes are all 1 and nothing is added (stock bits).
            log_size = run.size.log().to(hidden_states.dtype)[:, None, None, :]
            log_size = log_size.expand(batch, 1, tokens, tokens)
            bias = log_size if bias is None else bias + log_size
        capture_cls = index == run.attention_layer

        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        run.capturing_keys, run.keys = True, None
        try:
            hidden_states, attn_weights = self.self_attn(
                hidden_states=hidden_states,
                attention_mask=bias,
                causal_attention_mask=causal_attention_mask,
                output_attentions=bool(output_attentions) or capture_cls,
            )
        finally:
            run.capturing_keys = False
        keys, run.keys = run.keys, None
        hidden_states = residual + hidden_states

        # The metric: keys averaged over heads, as in ToMe.
        heads = self.self_attn.num_heads
        metric = keys.view(batch, tokens, heads, keys.shape[-1] // heads).mean(dim=2)
        matching = bipartite_soft_matching(metric, run.schedule[index], protect_cls=True)
        if capture_cls:
            cls_row = attn_weights[:, :, 0, :].mean(dim=1).float()
            run.cls_attention = matching.merge(cls_row[..., None], mode="sum")[..., 0]
        if not matching.is_identity:
            hidden_states, run.size = merge_weighted(hidden_states, run.size, matching)
            run.assignment = merge_assignment(run.assignment, matching)

        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states

        outputs = (hidden_states,)
        if output_attentions:
            outputs += (attn_weights,)  # over the tokens before this layer's merge
        return outputs


def _subclass(cls: Type) -> Type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"ToMe{cls.__name__}", (ToMeEncoderLayerMixin, cls), {})
    return _SUBCLASSES[cls]


def _encoder_layers(vision_tower) -> torch.nn.ModuleList:
    return vision_tower.vision_tower.vision_model.encoder.layers


def is_tome_applied(vision_tower) -> bool:
    return any(_ORIGINAL_CLASS in layer.__dict__ for layer in _encoder_layers(vision_tower))


def apply_tome(vision_tower, n_vis: int) -> ToMeRun:
    """Patch the layers of LLaVA's ``CLIPVisionTower`` up to its select layer so that every forward
    merges down to ``n_vis`` patch tokens there; returns the shared run state. Calling it again on
    a patched tower only changes ``n_vis``. Undo with ``remove_tome``."""
    layers = _encoder_layers(vision_tower)
    hidden_index, _ = _layer_indices(vision_tower.select_layer, len(layers))
    if is_tome_applied(vision_tower):
        run: ToMeRun = layers[0]._tome_run
        run.n_vis = n_vis
        return run
    run = ToMeRun(n_vis=n_vis, num_layers=hidden_index)

    def keep_keys(module, inputs, output):
        if run.capturing_keys:
            run.keys = output

    for index in range(hidden_index):
        layer = layers[index]
        handle = layer.self_attn.k_proj.register_forward_hook(keep_keys)
        layer.__dict__[_ORIGINAL_CLASS] = layer.__class__
        layer.__class__ = _subclass(layer.__class__)
        layer._tome_run = run
        layer._tome_index = index
        layer._tome_hook = handle
    return run


def remove_tome(vision_tower):
    """Give the tower back its stock layers (classes, no hooks, no ToMe attributes)."""
    for layer in _encoder_layers(vision_tower):
        original = layer.__dict__.pop(_ORIGINAL_CLASS, None)
        if original is None:
            continue
        layer.__class__ = original
        layer.__dict__.pop("_tome_hook").remove()
        layer.__dict__.pop("_tome_run", None)
        layer.__dict__.pop("_tome_index", None)
    return vision_tower


@torch.no_grad()
def encode_with_tome(vision_tower, images: torch.Tensor, n_vis: int) -> ToMeTokens:
    """Run LLaVA's ``CLIPVisionTower`` on ``images`` [B, 3, H, W] with ToMe up to the select layer
    only (later layers are not run), ``n_vis`` patch tokens coming out. n_vis = N0 (576) gives the
    stock select-layer features exactly. Each image is merged on its own; the batch only batches.
    """
    if getattr(vision_tower, "select_feature", "patch") != "patch":
        raise NotImplementedError("ToMe needs mm_vision_select_feature='patch'")
    clip = vision_tower.vision_tower.vision_model
    layers = clip.encoder.layers
    hidden_index, attention_index = _layer_indices(vision_tower.select_layer, len(layers))
    if hidden_index > 0 and attention_index != hidden_index - 1:
        raise NotImplementedError(
            f"select_layer {vision_tower.select_layer}: its attention is not inside the last layer run"
        )
    config = vision_tower.config
    num_patches = (config.image_size // config.patch_size) ** 2
    tome_schedule(num_patches, n_vis, hidden_index)  # fail before running anything

    hidden = clip.embeddings(images.to(device=vision_tower.device, dtype=vision_tower.dtype))
    hidden = clip.pre_layrnorm(hidden)
    batch = hidden.shape[0]
    patched_here = not is_tome_applied(vision_tower)
    run = apply_tome(vision_tower, n_vis)
    saved = (run.n_vis, run.attention_layer)
    run.n_vis, run.attention_layer = n_vis, attention_index
    try:
        for index in range(hidden_index):
            hidden = layers[index](hidden, None, None, output_attentions=False)[0]
    finally:
        run.n_vis, run.attention_layer = saved
        if patched_here:
            remove_tome(vision_tower)

    features = hidden[:, 1:].to(images.dtype)
    device = hidden.device
    if run.size is None:
        sizes = torch.ones(batch, num_patches, dtype=torch.float32, device=device)
        source = torch.arange(num_patches, device=device).expand(batch, -1).clone()
    else:
        sizes = run.size[:, 1:].float()
        source = run.assignment[:, 1:] - 1  # CLS never moves from index 0 and absorbs nothing
    cls_attention = None if run.cls_attention is None or hidden_index == 0 else run.cls_attention[:, 1:]
    run.size = run.assignment = run.cls_attention = None
    return ToMeTokens(features=features, sizes=sizes, source=source, cls_attention=cls_attention)


def check_tome_budget(model_path: str, n_vis: int) -> None:
    """Raise ValueError, before any weight is loaded, when ToMe cannot take a checkpoint's CLIP tower to
    ``n_vis`` tokens at its select layer (a bipartite merge at most halves a layer's tokens). Reads the
    checkpoint's config and, for a local tower, the tower's; a hub tower (CLIP ViT-L, 23 layers before
    LLaVA's select layer) reaches every budget."""
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
        tome_schedule(patches, n_vis, hidden_index)
    except ValueError as e:
        raise ValueError(f"{e} (the CLIP tower of {model_path} runs {hidden_index} layers before LLaVA's select "
                         "layer; a larger n_vis or a deeper tower is needed, e.g. the small checkpoint built with "
                         "--vision-layers 6)") from None
