"""The Qwen2.5-VL family behind restore's model-family seam (transformers' Qwen2_5_VLForConditionalGeneration).

What differs from LLaVA, and where it is handled here:

- environment: transformers 4.57.6 in ``.venv-qwen`` (``make install-qwen``); in the LLaVA environment
  (transformers 4.37.2) :meth:`QwenFamily.unavailable_reason` says so and the registry skips the family;
- visual tokens: the vision encoder's outputs after the 2 x 2 patch merger, one per 28 x 28 px; their count
  depends on the image (the image processor resizes it to a multiple of 28 within min/max pixels), so the
  budget of a reduction is a share of each image's tokens (or a count);
- no CLS token: each base's importance signal is the one its authors' Qwen code uses (docs/qwen2_5_vl.md);
- positions: M-RoPE (t, h, w) ids from ``get_rope_index``; decoding continues from ``rope_deltas``;
- prompts: the Instruct chat format, one ``<|vision_start|><|image_pad|>...<|vision_end|>`` per image,
  the pad repeated once per visual token (``expand_image_tokens``);
- preprocessing: the numpy/PIL ``Qwen2VLImageProcessor`` (the fast one needs torchvision, which this
  environment does not install); pixels come as flattened patches [n_patches, 3 * 2 * 14 * 14] with their
  grid ``image_grid_thw`` [1, 3].

``restore.apply(model, base="DivPrune", n_vis=..., restore=...)`` reduces each image to n_vis tokens (at most
its own count), ``restore.apply(model, base="DivPrune", keep=0.111, ...)`` to a share of each image's tokens;
qwen_patches/patch.py has the mechanism. DivPrune (on the visual tokens), VisPruner and HoloV (on the encoder's last-block attention,
qwen_patches/vision.py) are the bases implemented; the others are refused (docs/qwen2_5_vl.md).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from restore.families import CheckpointError, LoadedModel, ModelFamily

from .inputs import expand_image_tokens, image_inputs, pad_rows, prompt_ids, visual_tokens_of_grid
from .loading import check_protocol, load_image_processor, load_model, qwen_model_class, resolve_device_dtype

MODEL_TYPES = ("qwen2_5_vl",)
CONV_MODES = ("qwen2_5_vl",)


class QwenFamily(ModelFamily):
    name = "qwen2_5_vl"
    default_conv_mode = "qwen2_5_vl"
    varying_token_counts = True
    default_prompt_style = "lmms_eval"  # the paper's Qwen2.5-VL numbers follow lmms-eval (docs/qwen2_5_vl.md)

    def unavailable_reason(self) -> Optional[str]:
        try:
            qwen_model_class()
        except ImportError as error:
            return str(error)
        return None

    def recognizes_config(self, config: Mapping[str, Any]) -> bool:
        return config.get("model_type") in MODEL_TYPES

    def recognizes_model(self, model: Any) -> bool:
        try:
            cls = qwen_model_class()
        except ImportError:
            return False
        return isinstance(model, cls)

    # ---- restore.apply ----------------------------------------------------------------------------
    def check_model(self, model: Any) -> int:
        if not self.recognizes_model(model):
            raise TypeError(f"the Qwen2.5-VL family expects a transformers Qwen2_5_VLForConditionalGeneration, "
                            f"got {type(model).__name__}")
        # The count depends on each image; the upper end is the largest image the processor produces.
        return max_visual_tokens(model.config)

    def check_settings(self, model: Any, settings: Any) -> None:
        self._check_reduction(settings)
        attention = getattr(model.config, "_attn_implementation", "sdpa")
        if settings.calibrates and attention not in ("eager", "sdpa"):
            raise ValueError(f"calibrated attention needs eager or sdpa attention, the model uses {attention!r}")

    def check_budget(self, model_path: str, settings: Any) -> None:
        """The refusals that need no model, made before any shard starts."""
        self._check_reduction(settings)

    @staticmethod
    def _check_reduction(settings: Any) -> None:
        from .patch import SUPPORTED_BASES

        if settings.base not in SUPPORTED_BASES:
            raise ValueError(
                f"{settings.base} on Qwen2.5-VL is not implemented yet (implemented: {', '.join(SUPPORTED_BASES)}); "
                "docs/qwen2_5_vl.md says what each base's Qwen port uses")
        if settings.acts != "before_llm":
            raise ValueError(f"{settings.base} acts {settings.acts}; on Qwen2.5-VL only reductions before the LLM run")
        if settings.merged_position != "median":
            raise ValueError("on Qwen2.5-VL a merged token takes the per-axis median of its members' M-RoPE ids; "
                             f"merged_position={settings.merged_position!r} is not implemented")

    def patch_targets(self, model: Any) -> Iterable[Tuple[Any, type]]:
        from .patch import CalibratedQwenAttentionMixin, ReducedQwenModelMixin

        yield model.model, ReducedQwenModelMixin
        for layer in model.model.language_model.layers:
            yield layer.self_attn, CalibratedQwenAttentionMixin

    def new_context(self, settings: Any) -> Any:
        from .patch import QwenRestoreContext

        return QwenRestoreContext(settings)

    # ---- checkpoints and evaluation ---------------------------------------------------------------
    def check_checkpoint(self, model_path: str) -> Mapping[str, Any]:
        from restore.families import read_checkpoint_config

        _, config = read_checkpoint_config(os.path.expanduser(model_path))
        if not self.recognizes_config(config):
            raise CheckpointError(f"{model_path} is not a Qwen2.5-VL checkpoint (config.json model_type "
                                  f"{config.get('model_type')!r}, expected one of {', '.join(MODEL_TYPES)})")
        return config

    def visual_tokens_per_image(self, config: Mapping[str, Any]) -> int:
        return max_visual_tokens(config)

    def execution(self, device: str, dtype: str) -> Tuple[Any, Any]:
        import torch

        name, torch_dtype = resolve_device_dtype(device, dtype)
        return torch.device(name), torch_dtype

    def image_protocol(self, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                       jpeg_quality: Optional[int] = None) -> Optional[Dict[str, int]]:
        """The evaluation protocol's images, lmms-eval's: resized into 200704..12845056 px, re-encoded as JPEG
        quality 75; a value given replaces its default."""
        return check_protocol(min_pixels, max_pixels, jpeg_quality)

    def load(self, model_path: str, *, model_base: Optional[str] = None, device: str = "auto",
             dtype: str = "auto", image_protocol: Optional[Mapping[str, int]] = None) -> LoadedModel:
        """``image_protocol`` None: the checkpoint's own processor (its preprocessor_config.json); the
        evaluation entry points pass the protocol's (:meth:`image_protocol`)."""
        tokenizer, model, image_processor = load_model(model_path, model_base=model_base, device=device, dtype=dtype,
                                                       image_protocol=image_protocol)
        return LoadedModel(tokenizer, model, image_processor, self.model_name(model_path))

    def model_name(self, model_path: str) -> str:
        return os.path.basename(os.path.normpath(os.path.expanduser(model_path)))

    def conv_modes(self) -> List[str]:
        return list(CONV_MODES)

    def prompt_ids(self, tokenizer: Any, text: str, has_image: bool, conv_mode: str, model_config: Any) -> Any:
        """Token ids [L] of the prompt, with ONE image pad token per image: ``expand_image_tokens`` repeats it
        once the image's grid is known (``inputs.build_inputs`` does both)."""
        if conv_mode not in CONV_MODES:
            raise ValueError(f"unknown conversation mode {conv_mode!r} for Qwen2.5-VL; known: {', '.join(CONV_MODES)}")
        return prompt_ids(tokenizer, text, has_image)

    def preprocess_image(self, image: Any, image_processor: Any, model_config: Any, settings: Any = None) -> Any:
        """(pixel_values [n_patches, 3 * 2 * 14 * 14], image_grid_thw [1, 3]) of one image, as the
        image processor makes them (the same for every configuration: reductions act after the encoder)."""
        return image_inputs(image, image_processor)

    def preprocessing_key(self, model_config: Any, settings: Any) -> Any:
        return "default"

    def preprocessing_for_check(self, model_path: str, settings: Any = None,
                                image_protocol: Optional[Mapping[str, int]] = None) -> Callable[[Any], Any]:
        config = self.check_checkpoint(model_path)
        processor = load_image_processor(model_path, image_protocol)
        return lambda image: self.preprocess_image(image, processor, config, settings)

    def shared_encoding(self, model: Any) -> ContextManager[Any]:
        return nullcontext(None)

    # ---- generation (the evaluation runner) -------------------------------------------------------
    def pixels_dtype(self, model: Any) -> Any:
        return next(model.model.visual.parameters()).dtype

    def batch_images(self, pixels: Any, device: Any, dtype: Any) -> Any:
        """A list of (pixel_values, image_grid_thw) per row, on the device (Qwen's images differ in size)."""
        if not pixels:
            return None
        return [(values.to(device=device, dtype=dtype), grid.to(device)) for values, grid in pixels]

    def generate(self, model: Any, tokenizer: Any, prompts: Sequence[Any], images: Any, image_sizes: Any,
                 **generate_kwargs: Any) -> Any:
        """Each prompt's image pad repeated once per visual token of its image, the rows padded on the left
        (as ``inputs.build_inputs``), the pixels and grids concatenated in row order; the generated tokens."""
        import torch

        device = next(model.parameters()).device
        merge = int(model.config.vision_config.spatial_merge_size)
        rows = []
        for k, ids in enumerate(prompts):
            ids = [int(t) for t in ids]
            if images is not None:
                ids = expand_image_tokens(ids, model.config.image_token_id,
                                          [visual_tokens_of_grid(images[k][1][0], merge)])
            rows.append(ids)
        input_ids, attention_mask = pad_rows(rows, tokenizer.pad_token_id, "left")
        extra = {}
        if images is not None:
            extra = {"pixel_values": torch.cat([values for values, _ in images], dim=0),
                     "image_grid_thw": torch.cat([grid for _, grid in images], dim=0)}
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             **extra, **generate_kwargs)
        return out[:, input_ids.shape[1]:]


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def max_visual_tokens(config: Any, max_pixels: Optional[int] = None) -> int:
    """The most visual tokens one image can have: max_pixels / (patch * merge)^2 (Qwen2.5-VL's processor default
    max_pixels is 12845056 = 16384 tokens of 28 x 28 px)."""
    vision = _get(config, "vision_config", {}) or {}
    patch = int(_get(vision, "patch_size", 14))
    merge = int(_get(vision, "spatial_merge_size", 2))
    max_pixels = 12845056 if max_pixels is None else max_pixels
    return max(1, max_pixels // (patch * merge) ** 2)


FAMILY = QwenFamily()

