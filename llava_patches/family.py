"""The LLaVA family (llava-torch's LlavaLlamaForCausalLM: LLaVA-1.5, and LLaVA-NeXT through its anyres
config) behind restore's model-family seam.

Everything restore and the evaluation entry points need to know about LLaVA goes through ``FAMILY``:
recognising its checkpoints and models, loading, the conversation prompt and image preprocessing of
LLaVA's own evaluation scripts, and which modules ``restore.apply`` patches (llava_patches/patch.py).
A NeXT checkpoint runs stock unreduced and in the fixed 2880-token layout reduced
(llava_patches/next_layout.py); the two read different pixels (``preprocessing_key``).
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Callable, ContextManager, Hashable, Iterable, List, Mapping, Optional, Tuple

from restore.families import CheckpointError, LoadedModel, ModelFamily

from .next_layout import VIEWS, grid_pixels, is_next
from .next_layout import preprocessing_key as next_preprocessing_key

# model_type of LLaVA-Llama checkpoints: the released LLaVA-1.5 configs say "llava", LLaVA's code "llava_llama".
LLAVA_LLAMA_TYPES = ("llava", "llava_llama")
# 24 x 24 patches of CLIP ViT-L/14 at 336 px, LLaVA-1.5's vision tower.
LLAVA_15_VISUAL_TOKENS = 576


class LlavaFamily(ModelFamily):
    name = "llava"
    default_conv_mode = "vicuna_v1"

    def recognizes_config(self, config: Mapping[str, Any]) -> bool:
        return "mm_vision_tower" in config and config.get("model_type") in LLAVA_LLAMA_TYPES

    def recognizes_model(self, model: Any) -> bool:
        try:
            from llava.model import LlavaLlamaForCausalLM
        except ImportError as error:  # pragma: no cover - llava is a hard dependency
            raise ImportError("restore needs llava-torch: pip install --no-deps llava-torch==1.2.2.post1") from error
        return isinstance(model, LlavaLlamaForCausalLM)

    # ---- restore.apply ----------------------------------------------------------------------------
    def check_model(self, model: Any) -> int:
        if not self.recognizes_model(model):
            raise TypeError(
                f"restore.apply expects a llava LlavaLlamaForCausalLM (LLaVA-1.5 or NeXT), got {type(model).__name__}; "
                "load one with llava_patches.load_model or llava.model.builder.load_pretrained_model"
            )
        tower = model.get_vision_tower()
        if tower is None or not getattr(tower, "is_loaded", False):
            raise ValueError("the model has no loaded vision tower; load the checkpoint with its CLIP tower first")
        attention = getattr(model.config, "_attn_implementation", "eager")
        if attention not in ("eager", "sdpa"):
            raise ValueError(f"restore supports eager and sdpa attention, the model uses {attention!r}; "
                             "load it with attn_implementation='sdpa'")
        if getattr(model.config, "rope_scaling", None):
            raise ValueError("restore supports plain RoPE only (config.rope_scaling must be unset, as in LLaVA-1.5)")
        return int(tower.num_patches) * (VIEWS if is_next(model.config) else 1)

    def check_settings(self, model: Any, settings: Any) -> None:
        _check_next_settings(model.config, settings)
        if settings.merges_itself:  # inside CLIP (ToMe halves a layer's tokens at most): the depth bounds the budget
            from .encoder_reduce import encoder_method
            from .vision import _layer_indices

            tower = model.get_vision_tower()
            hidden_index, _ = _layer_indices(tower.select_layer, len(tower.vision_tower.vision_model.encoder.layers))
            encoder_method(settings).check(settings.num_patches, settings.n_vis, hidden_index)

    def patch_targets(self, model: Any) -> Iterable[Tuple[Any, type]]:
        from .inllm import InLLMDecoderLayerMixin
        from .patch import CalibratedAttentionMixin, CalibratedLlamaModelMixin, ReducedLlavaMixin, RetainedRopeMixin

        llm = model.get_model()
        yield model, ReducedLlavaMixin
        yield llm, CalibratedLlamaModelMixin
        for layer in llm.layers:
            yield layer, InLLMDecoderLayerMixin
            yield layer.self_attn, CalibratedAttentionMixin
            yield layer.self_attn.rotary_emb, RetainedRopeMixin

    def new_context(self, settings: Any) -> Any:
        from .patch import RestoreContext

        return RestoreContext(settings)

    # ---- checkpoints and evaluation ---------------------------------------------------------------
    def check_checkpoint(self, model_path: str) -> Mapping[str, Any]:
        from .loading import check_checkpoint

        return check_checkpoint(os.path.expanduser(model_path))[2]

    def visual_tokens_per_image(self, config: Mapping[str, Any]) -> int:
        # NeXT's reduced rows see every image as the fixed 2x2 grid: base view + 4 crops of 576 patches.
        return LLAVA_15_VISUAL_TOKENS * (VIEWS if is_next(config) else 1)

    def check_budget(self, model_path: str, settings: Any) -> None:
        if _next_may_refuse(settings):
            from restore.families import read_checkpoint_config

            try:
                config = read_checkpoint_config(os.path.expanduser(model_path))[1]
            except (FileNotFoundError, CheckpointError):
                config = {}  # as check_tome_budget: a checkpoint that cannot be read is reported when it loads
            _check_next_settings(config, settings)
        if settings.merges_itself:
            from .encoder_reduce import check_encoder_budget, encoder_method

            check_encoder_budget(model_path, encoder_method(settings), settings.n_vis)

    def execution(self, device: str, dtype: str) -> Tuple[Any, Any]:
        from .loading import resolve_device, resolve_dtype

        resolved = resolve_device(device)
        return resolved, resolve_dtype(dtype, resolved)

    def load(self, model_path: str, *, model_base: Optional[str], device: str, dtype: str,
             image_protocol: Optional[Mapping[str, int]] = None) -> LoadedModel:
        from .loading import load_model

        if image_protocol:
            self.image_protocol(**image_protocol)  # refuses it, saying why

        tokenizer, model, image_processor, _ = load_model(model_path, model_base=model_base, device=device, dtype=dtype)
        return LoadedModel(tokenizer, model, image_processor, self.model_name(model_path))

    def model_name(self, model_path: str) -> str:
        from llava.mm_utils import get_model_name_from_path

        return get_model_name_from_path(os.path.expanduser(model_path))

    def conv_modes(self) -> List[str]:
        from llava.conversation import conv_templates

        return sorted(conv_templates)

    def effective_conv_mode(self, model_path: str, conv_mode: str) -> str:
        # As LLaVA's scripts: a pretrain-only ("plain", not "finetune") checkpoint gets the _mmtag template.
        model_name = self.model_name(model_path)
        if "plain" in model_name and "finetune" not in model_name.lower() and "mmtag" not in conv_mode:
            return conv_mode + "_mmtag"
        return conv_mode

    def prompt_ids(self, tokenizer: Any, text: str, has_image: bool, conv_mode: str, model_config: Any) -> Any:
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import tokenizer_image_token

        from .loading import conversation_prompt

        prompt = conversation_prompt(text, has_image, conv_mode, getattr(model_config, "mm_use_im_start_end", False))
        return tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")

    def preprocess_image(self, image: Any, image_processor: Any, model_config: Any, settings: Any = None) -> Any:
        """Pixels of one image for a configuration (``settings``: its ReductionSettings, None unreduced):
        LLaVA's own process_images, except NeXT's reduced rows, which take the fixed 2x2 grid [5, 3, 336, 336]."""
        from llava.mm_utils import process_images

        def process(picture):
            if settings is not None and is_next(model_config):
                return grid_pixels(picture, image_processor)
            return process_images([picture], image_processor, model_config)[0]

        try:
            return process(image)
        except TypeError:
            # Padding an image whose mode takes no RGB fill colour (L, LA, I;16...) fails inside LLaVA, which
            # would stop the official scripts; converting such an image to RGB first is the only way on.
            return process(image.convert("RGB"))

    def preprocessing_key(self, model_config: Any, settings: Any) -> Hashable:
        """Configurations with equal keys read the same pixels of an image (see preprocess_image)."""
        return next_preprocessing_key(settings) if is_next(model_config) else "default"

    def preprocessing_for_check(self, model_path: str, settings: Any = None,
                                image_protocol: Optional[Mapping[str, int]] = None) -> Callable[[Any], Any]:
        from transformers import CLIPImageProcessor

        config = self.check_checkpoint(model_path)
        vision_tower = config["mm_vision_tower"]
        try:
            # LLaVA's CLIP vision tower builds its image processor this same way when it loads.
            image_processor = CLIPImageProcessor.from_pretrained(vision_tower)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"the image processor of the vision tower {vision_tower!r} (from the config of "
                                  f"{model_path}) cannot be loaded: {e}") from None
        # process_images reads only image_aspect_ratio (and image_grid_pinpoints) from the model's config.
        model_config = SimpleNamespace(**config)
        return lambda image: self.preprocess_image(image, image_processor, model_config, settings)

    def shared_encoding(self, model: Any) -> ContextManager[Any]:
        from .vision import shared_vision_encoding

        return shared_vision_encoding(model)

    def pixels_dtype(self, model: Any) -> Any:
        return next(model.get_model().mm_projector.parameters()).dtype

    def batch_images(self, pixels: Any, device: Any, dtype: Any) -> Any:
        from restore.eval.runner import _batch_images

        return _batch_images(pixels, device, dtype)

    def generate(self, model: Any, tokenizer: Any, prompts: Any, images: Any, image_sizes: Any,
                 **generate_kwargs: Any) -> Any:
        from restore.eval.runner import llava_generate

        return llava_generate(model, tokenizer, prompts, images, image_sizes, **generate_kwargs)


def _next_may_refuse(settings: Any) -> bool:
    import tokenreduction as tr

    return settings.merges_itself or settings.acts == "llm" or \
        (tr.budget_scope(settings.base) == "per_view" and settings.n_vis < VIEWS)


def _check_next_settings(model_config: Any, settings: Any) -> None:
    """What the fixed NeXT layout cannot carry out, in words (a model's config or a config.json mapping)."""
    if not is_next(model_config) or not _next_may_refuse(settings):
        return
    if settings.merges_itself:
        # ToMe would merge inside each 336 px view, and its merged tokens have no place on the stitched
        # canvas that positions and the per-crop budget scope are defined on; not implemented for NeXT.
        raise ValueError(f"{settings.base} merges inside the vision tower, which restore does not support on "
                         "LLaVA-NeXT (anyres) checkpoints; use HoloV, DivPrune, VisPruner or VisionZip")
    if settings.acts == "llm":
        # The in-LLM mechanism tracks one view per image; NeXT's five views per image are not wired into it.
        raise ValueError(f"{settings.base} cuts tokens inside the LLM, which restore supports on LLaVA-1.5, not on "
                         "LLaVA-NeXT (anyres) checkpoints; use HoloV, DivPrune, VisPruner or VisionZip")
    import tokenreduction as tr

    if tr.budget_scope(settings.base) == "per_view" and settings.is_plain_base and \
            tr.plain_reduction(settings.base) is not None and settings.n_vis < VIEWS:
        raise ValueError(f"{settings.base} reduces each of a NeXT image's {VIEWS} views on its own: "
                         f"n_vis must be at least {VIEWS}, got {settings.n_vis}")


FAMILY = LlavaFamily()
