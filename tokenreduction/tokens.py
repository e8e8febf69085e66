"""The inputs every selector sees."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class VisualTokens:
    """Visual tokens of a batch of images, in patch order (row-major over the 24x24 grid).

    features:      [B, N, D] projected tokens (after the mm_projector), what the LLM sees.
    raw_features:  [B, N, C] vision-encoder patch features of the select layer.
    cls_attention: [B, N]    CLS->patch attention of the select layer, averaged over heads.
    keys:          [B, N, Ck] keys of the patches in the select layer's attention, averaged over
                   heads (VisionZip's similarity); only computed when asked for.
    cls_raw_feature: [B, C]  the CLS token's select-layer feature (VisionZip keeps it); only when asked.
    """

    features: torch.Tensor
    raw_features: Optional[torch.Tensor] = None
    cls_attention: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    cls_raw_feature: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.features.dim() != 3:
            raise ValueError(f"features must be [B, N, D], got shape {tuple(self.features.shape)}")
        B, N, _ = self.features.shape
        if self.raw_features is not None and (
            self.raw_features.dim() != 3 or tuple(self.raw_features.shape[:2]) != (B, N)
        ):
            raise ValueError(
                f"raw_features must be [B, N, C] with B={B}, N={N}, got shape {tuple(self.raw_features.shape)}"
            )
        if self.cls_attention is not None and tuple(self.cls_attention.shape) != (B, N):
            raise ValueError(
                f"cls_attention must be [B, N] = [{B}, {N}], got shape {tuple(self.cls_attention.shape)}"
            )
        if self.keys is not None and (self.keys.dim() != 3 or tuple(self.keys.shape[:2]) != (B, N)):
            raise ValueError(f"keys must be [B, N, Ck] with B={B}, N={N}, got shape {tuple(self.keys.shape)}")
        if self.cls_raw_feature is not None:
            C = self.raw_features.shape[-1] if self.raw_features is not None else None
            if self.cls_raw_feature.dim() != 2 or self.cls_raw_feature.shape[0] != B or (
                C is not None and self.cls_raw_feature.shape[1] != C
            ):
                raise ValueError(
                    f"cls_raw_feature must be [B, C] with B={B}, C as in raw_features ({C}), "
                    f"got shape {tuple(self.cls_raw_feature.shape)}"
                )

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]

    def require(self, method: str, *fields: str) -> None:
        """Raise a clear error when a method needs inputs that were not given."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{method} needs VisualTokens.{', VisualTokens.'.join(missing)}; it was not given")


@dataclass
class OwnReduction:
    """What a method's own plain-row reduction feeds the LLM (see registry.register_plain_reduction).

    features:  [B, n, C] tokens in the LLM's order; ``space`` says whether they are ``"raw"`` (select-layer
               features: the caller applies the mm_projector, as VisionZip's official code does) or
               ``"projected"``.
    positions: [B, n] a representative patch index per token (informative: the plain row re-indexes).
    sizes:     [B, n] float32, original patches each token stands for.
    source:    [B, N] long, the token each patch ended up in, -1 when dropped.
    """

    features: torch.Tensor
    space: str
    positions: torch.Tensor
    sizes: torch.Tensor
    source: torch.Tensor
