"""Run LLaVA's CLIP tower up to the select layer and return that layer's CLS->patch attention too.

Stock LLaVA asks CLIP for every layer's hidden states and runs layers it never uses; the official
RESTORE code also asks for every layer's attention maps. Here the encoder stops at the select layer,
and only the layer whose attention is wanted is called with ``output_attentions=True``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch

import tokenreduction as tr


def _layer_indices(select_layer: int, num_layers: int) -> Tuple[int, int]:
    """(hidden-state index, attention-layer index) that LLaVA's ``select_layer`` picks.

    ``hidden_states`` has num_layers + 1 entries (the embeddings first), ``attentions`` num_layers;
    both are indexed with the same ``select_layer`` (for -2: the output of, and the attention inside,
    the second-to-last layer).
    """
    hidden_index = select_layer % (num_layers + 1)
    attention_index = select_layer % num_layers
    return hidden_index, attention_index


@torch.no_grad()
def encode_with_cls_attention(
    vision_tower, images: torch.Tensor, *, with_keys: bool = False, with_cls: bool = False
) -> Tuple[torch.Tensor, ...]:
    """Patch features [B, N, C] of the select layer and head-averaged CLS->patch attention [B, N].

    ``vision_tower`` is LLaVA's ``CLIPVisionTower``. Features come back in ``images.dtype`` like
    stock LLaVA; the attention is averaged over heads in that dtype and returned as float32.

    Only when asked (VisionZip needs them), after those two: ``with_keys`` the patch keys [B, N, Ck]
    of that attention layer averaged over heads, in the tower's dtype (taken from the layer's own
    key projection as it runs, not recomputed); ``with_cls`` the CLS token's feature [B, C].
    """
    if getattr(vision_tower, "select_feature", "patch") != "patch":
        raise NotImplementedError("token reduction needs mm_vision_select_feature='patch'")
    clip = vision_tower.vision_tower.vision_model
    layers = clip.encoder.layers
    hidden_index, attention_index = _layer_indices(vision_tower.select_layer, len(layers))

    hidden = clip.embeddings(images.to(device=vision_tower.device, dtype=vision_tower.dtype))
    hidden = clip.pre_layrnorm(hidden)
    selected = hidden if hidden_index == 0 else None
    cls_attention = None
    captured = {}
    if with_keys:
        # One-shot: the hook removes itself when the attention layer runs, so that an exception
        # inside CLIP cannot leave it behind for later calls.
        def keep_keys(_module, _inputs, output):
            captured["keys"] = output
            key_hook.remove()

        key_hook = layers[attention_index].self_attn.k_proj.register_forward_hook(keep_keys)
    for index in range(max(hidden_index, attention_index + 1)):
        wants_attention = index == attention_index
        outputs = layers[index](hidden, None, None, output_attentions=wants_attention)
        hidden = outputs[0]
        if wants_attention:
            cls_attention = outputs[1][:, :, 0, 1:]
        if index + 1 == hidden_index:
            selected = hidden
    features = selected[:, 1:].to(images.dtype)
    cls_attention = cls_attention.to(images.dtype).mean(dim=1).float()
    extras = ()
    if with_keys:
        extras += (_head_mean_keys(captured["keys"], layers[attention_index].self_attn.num_heads)[:, 1:],)
    if with_cls:
        extras += (selected[:, 0].to(images.dtype),)
    return (features, cls_attention) + extras


def _head_mean_keys(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, H * d] key projection -> [B, L, d] mean over heads, reduced over a contiguous
    [B, H, L, d] layout as VisionZip does, so that the rounding is the same."""
    batch_size, length, _ = keys.shape
    return keys.view(batch_size, length, num_heads, -1).transpose(1, 2).contiguous().mean(dim=1)


def encode_visual_tokens(
    model, images: torch.Tensor, *, with_keys: bool = False, with_cls: bool = False
) -> tr.VisualTokens:
    """What every selector sees for ``images`` [I, 3, H, W] on a LLaVA model: projected features,
    the select layer's features and its CLS attention; with the flags also ``keys`` and
    ``cls_raw_feature`` (VisionZip's inputs, see encode_with_cls_attention)."""
    llm = model.get_model()
    tower = llm.get_vision_tower()
    memo = memo_of(tower)
    known = memo.lookup(images) if memo is not None else None
    if known is not None:
        raw, cls_attention, keys, cls_raw_feature = known
        keys, cls_raw_feature = (keys if with_keys else None), (cls_raw_feature if with_cls else None)
    else:
        raw, cls_attention, *extras = encode_with_cls_attention(tower, images, with_keys=with_keys, with_cls=with_cls)
        keys = extras.pop(0) if with_keys else None
        cls_raw_feature = extras.pop(0) if with_cls else None
    return tr.VisualTokens(
        features=llm.mm_projector(raw),
        raw_features=raw,
        cls_attention=cls_attention,
        keys=keys,
        cls_raw_feature=cls_raw_feature,
    )


# --------------------------------------------------------------------------------------------------
# One encoding of a batch's images for several configurations (sweeps)


class VisionEncodingMemo:
    """The select layer's outputs for the images of one batch, computed once and handed to every
    configuration of a sweep that asks for them.

    What the tower produces for an image depends on the pixels alone, never on the reduction that
    follows, so every configuration except those that change the encoder itself (ToMe) can share it.
    A request for exactly the batch that was encoded gets those very tensors back, so that its values
    are the ones a separate run computes; a request for some of its images gets their rows.
    """

    def __init__(self, vision_tower) -> None:
        self.vision_tower = vision_tower
        self.pixels: Optional[torch.Tensor] = None
        self.outputs: Optional[Tuple[torch.Tensor, ...]] = None  # features, CLS attention, keys, CLS feature
        self.images_encoded = 0

    def encode(self, images: torch.Tensor) -> None:
        """Run the tower once on ``images`` [B, 3, H, W], keeping everything any selector reads. LLaVA-NeXT
        pixels [B, views, 3, H, W] are encoded as the rows stock llava feeds its tower."""
        images = images.flatten(0, 1) if images.dim() == 5 else images
        self.outputs = encode_with_cls_attention(self.vision_tower, images, with_keys=True, with_cls=True)
        self.pixels = images
        self.images_encoded += int(images.shape[0])

    def lookup(self, images: torch.Tensor) -> Optional[Tuple[torch.Tensor, ...]]:
        """The outputs for ``images``, or None when some image of them was not encoded."""
        if self.pixels is None or images.dim() != 4 or images.dtype != self.pixels.dtype \
                or images.shape[1:] != self.pixels.shape[1:]:
            return None
        if images.shape == self.pixels.shape and torch.equal(images, self.pixels.to(images.device)):
            return self.outputs
        rows = []
        for image in images:
            row = next((j for j, known in enumerate(self.pixels) if torch.equal(image, known.to(image.device))), None)
            if row is None:
                return None
            rows.append(row)
        index = torch.tensor(rows, device=self.outputs[0].device)
        return tuple(output.index_select(0, index.to(output.device)) for output in self.outputs)


_MEMO = "_restore_encoding_memo"


class _MemoizedTowerMixin:
    """On LLaVA's ``CLIPVisionTower`` during a sweep: the unreduced model's encoding comes from the memo."""

    def forward(self, images):
        known = getattr(self, _MEMO).lookup(images) if torch.is_tensor(images) else None
        return super().forward(images) if known is None else known[0]


_MEMOIZED_CLASSES: dict = {}


@contextlib.contextmanager
def shared_vision_encoding(model) -> Iterator[VisionEncodingMemo]:
    """While active, every configuration applied to ``model`` (stock or reduced) takes its select-layer
    encoding from the returned memo when the memo holds its images; call ``memo.encode`` first."""
    tower = model.get_model().get_vision_tower()
    original = tower.__class__
    if original not in _MEMOIZED_CLASSES:
        _MEMOIZED_CLASSES[original] = type(f"Memoized{original.__name__}", (_MemoizedTowerMixin, original), {})
    memo = VisionEncodingMemo(tower)
    setattr(tower, _MEMO, memo)
    tower.__class__ = _MEMOIZED_CLASSES[original]
    try:
        yield memo
    finally:
        tower.__class__ = original
        tower.__dict__.pop(_MEMO, None)


def memo_of(vision_tower) -> Optional[VisionEncodingMemo]:
    return getattr(vision_tower, _MEMO, None)
