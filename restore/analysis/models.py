"""The models the benchmark and the analyses run, and their prompt inputs.

- a LLaVA-1.5 checkpoint folder or hub name (``load_model``),
- the small random checkpoint (built once under playground/checkpoints),
- a random-weight model with LLaVA-1.5-7B's widths and any number of LLM layers, built in memory
  (no weights on disk), for 7B-shaped timings without the 7B weights.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

import tokenreduction as tr
from llava_patches.loading import load_model, make_inputs, resolve_device, resolve_dtype
from llava_patches.vision import encode_visual_tokens
from restore.flops import LLMShape
from restore.small_checkpoint import DEFAULT_CHECKPOINT_DIR, VISION_SUBDIR, ensure_small_checkpoint, synthetic_image

SHAPES = ("small", "7b")
DEFAULT_QUESTION = "What is shown in the image? Answer the question using a single word or phrase."


@dataclass
class BenchModel:
    tokenizer: Any
    model: torch.nn.Module
    image_processor: Any
    description: str  # what the model is, for tables and JSON

    @property
    def shape(self) -> LLMShape:
        return LLMShape.from_config(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def small_checkpoint_path(num_layers: int = 4) -> Path:
    """Default small checkpoint; another layer count gets its own folder so the default is never rebuilt."""
    if num_layers == 4:
        return DEFAULT_CHECKPOINT_DIR
    return DEFAULT_CHECKPOINT_DIR.with_name(f"{DEFAULT_CHECKPOINT_DIR.name}-{num_layers}l")


def load_bench_model(
    model_path: Optional[str] = None,
    shape: str = "small",
    layers: Optional[int] = None,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: Optional[str] = None,
) -> BenchModel:
    """A checkpoint (``model_path``), or a random model of ``shape`` "small" or "7b" with ``layers`` LLM layers."""
    if model_path is not None:
        tokenizer, model, processor, _ = load_model(model_path, device=device, dtype=dtype,
                                                    attn_implementation=attn_implementation)
        return BenchModel(tokenizer, model, processor, f"checkpoint {model_path}")
    if shape == "small":
        num_layers = 4 if layers is None else layers
        path = ensure_small_checkpoint(small_checkpoint_path(num_layers), num_layers=num_layers)
        tokenizer, model, processor, _ = load_model(path, device=device, dtype=dtype,
                                                    attn_implementation=attn_implementation)
        return BenchModel(tokenizer, model, processor, f"small random checkpoint ({num_layers} LLM layers)")
    if shape == "7b":
        target = resolve_device(device)
        num_layers = (32 if target.type == "cuda" else 2) if layers is None else layers
        return build_7b_shaped(num_layers, device=target, dtype=resolve_dtype(dtype, target),
                               attn_implementation=attn_implementation)
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES} or pass --model-path")


# --------------------------------------------------------------------------------------------------
# LLaVA-1.5-7B-shaped random model
# --------------------------------------------------------------------------------------------------

def _clip_l336_config():
    from transformers import CLIPVisionConfig

    # openai/clip-vit-large-patch14-336's vision tower.
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)


def _llava_7b_config(num_layers: int, vision_tower: str, attn_implementation: Optional[str]):
    from llava.model.language_model.llava_llama import LlavaConfig

    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    # liuhaotian/llava-v1.5-7b's config, with num_hidden_layers chosen.
    return LlavaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers,
        num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=True,
        mm_vision_tower=vision_tower, mm_hidden_size=1024, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad",
        tokenizer_padding_side="right", tokenizer_model_max_length=2048, **extra,
    )


def _fill_random(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) weights, ones/zeros for norms, drawn on the model's device."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "layrnorm" in name:  # CLIP spells one "pre_layrnorm"
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, std, generator=generator)


def _rebuild_buffers(llava: torch.nn.Module, clip: torch.nn.Module, device: torch.device) -> None:
    """Recompute the non-persistent buffers ``to_empty`` left uninitialised (RoPE caches, CLIP position ids)."""
    with torch.device(device):
        for layer in llava.get_model().layers:
            layer.self_attn._init_rope()
    embeddings = clip.vision_model.embeddings
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions, device=device).expand((1, -1)),
                               persistent=False)
    expected = {"inv_freq", "cos_cached", "sin_cached", "position_ids"}
    unknown = {name for module in (llava, clip) for name, _ in module.named_buffers()
               if name.rsplit(".", 1)[-1] not in expected}
    if unknown:  # a transformers version with buffers this builder does not know to initialise
        raise RuntimeError(f"7B-shaped model: uninitialised buffers {sorted(unknown)}; extend _rebuild_buffers")


def build_7b_shaped(
    num_layers: int = 2,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: Optional[str] = None,
    seed: int = 0,
) -> BenchModel:
    """LLaVA-1.5-7B's widths (Vicuna-7B LLM, CLIP ViT-L/14-336, 2-layer MLP projector), random weights.

    Built on the meta device and materialised directly on ``device`` in ``dtype``: nothing is
    written to disk but a vision config in a temporary folder. The tokenizer and image processor
    come from the small checkpoint (336 px CLIP preprocessing; a 1024-piece vocabulary, so prompts
    are a few tokens shorter or longer than with LLaMA's tokenizer).
    """
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

    if num_layers < 1:
        raise ValueError(f"--layers must be >= 1, got {num_layers}")
    device = torch.device(device)
    small = ensure_small_checkpoint(small_checkpoint_path(4))
    tokenizer = AutoTokenizer.from_pretrained(str(small), use_fast=False)
    processor = CLIPImageProcessor.from_pretrained(str(small / VISION_SUBDIR))

    vision_config = _clip_l336_config()
    with tempfile.TemporaryDirectory(prefix="llava-7b-shaped-") as folder:
        vision_config.save_pretrained(folder)  # LLaVA's tower reads its config from mm_vision_tower
        config = _llava_7b_config(num_layers, folder, attn_implementation)
        with torch.device("meta"):
            model = LlavaLlamaForCausalLM(config)
            clip = CLIPVisionModel(vision_config)
    model.to(dtype=dtype).to_empty(device=device)
    clip.to(dtype=dtype).to_empty(device=device)
    _fill_random(model, seed)
    _fill_random(clip, seed + 1)
    _rebuild_buffers(model, clip, device)
    clip.requires_grad_(False)

    tower = model.get_vision_tower()
    tower.vision_tower = clip
    tower.image_processor = processor
    tower.is_loaded = True
    model.config.mm_vision_tower = "openai/clip-vit-large-patch14-336"  # what it stands for; the folder is gone
    model.config.torch_dtype = dtype
    model.requires_grad_(False)
    model.eval()
    return BenchModel(tokenizer, model, processor,
                      f"LLaVA-1.5-7B-shaped random model ({num_layers} of 32 LLM layers, full CLIP ViT-L/14-336)")


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def load_image(path: Optional[str] = None, seed: int = 0) -> Image.Image:
    """The image at ``path``, or the small checkpoint's synthetic image for ``seed``."""
    if path is None:
        return synthetic_image(seed)
    return Image.open(path).convert("RGB")


def visual_tokens(bench: BenchModel, images: torch.Tensor) -> tr.VisualTokens:
    """What the reduced path feeds the selectors: projected features, raw features, CLS attention."""
    return encode_visual_tokens(bench.model, images)


def prompt_inputs(bench: BenchModel, image: Image.Image, question: str = DEFAULT_QUESTION):
    """(input_ids [1, L], images [1, 3, 336, 336], image_sizes) on the model's device, images in its dtype."""
    input_ids, images = make_inputs(bench.tokenizer, bench.image_processor, question, image,
                                    model_config=bench.model.config, device=bench.device, dtype=bench.dtype)
    return input_ids, images, [image.size]
