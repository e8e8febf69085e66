"""Deterministic small LLaVA-1.5-shaped checkpoints with random weights, for CPU tests and demos.

The checkpoint has the shapes that matter to visual token reduction (336 px CLIP with 14 px patches,
so 576 visual tokens; select layer -2; LLM head dim 128 as in LLaVA-7B; vicuna_v1 prompts) and is
small enough for a laptop CPU. LLaVA's own builder loads it without network access:

    path = build_small_checkpoint("playground/checkpoints/llava-v1.5-small-random", seed=0)
    python -m restore.small_checkpoint --out playground/checkpoints/llava-v1.5-small-random --seed 0

Weights are drawn per tensor from a local ``torch.Generator`` seeded from (seed, tensor name), so the
same seed gives byte-identical weight files and the global RNG state is never touched.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from .jsonio import read_json

DEFAULT_CHECKPOINT_DIR = Path("playground/checkpoints/llava-v1.5-small-random")
VISION_SUBDIR = "vision_tower"
MANIFEST_NAME = "small_checkpoint.json"
# Bump when the recipe changes, so that cached checkpoints from an older recipe get rebuilt.
RECIPE_VERSION = 2

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class SmallShapes:
    """Sizes of the small model. Head dim 128 and 576 patches match LLaVA-1.5-7B; the rest is shrunk."""

    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 2
    num_kv_heads: int = 2
    intermediate_size: int = 688  # 256 * 11008 / 4096, the LLaMA-7B ratio
    vision_hidden_size: int = 64
    vision_heads: int = 4
    vision_layers: int = 3
    vision_intermediate_size: int = 256
    image_size: int = 336
    patch_size: int = 14
    tokenizer_vocab_size: int = 1024


# Standard deviations of the random weights. Large q/k weights in the CLIP make CLS attention peaked
# like a trained CLIP's (a default init gives a nearly uniform one, whose ranking is fp noise); LLM
# weights well above the usual 0.02 make outputs depend visibly on the image and prompt.
VISION_QK_STD = 0.17
VISION_LINEAR_STD = 0.05
VISION_POSITION_STD = 0.02
VISION_BIAS_STD = 0.02
LLM_STD = 0.08


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_SHORT_ANSWER = "Answer the question using a single word or phrase."
_OPTION_LETTER = "Answer with the option's letter from the given choices directly."

_OBJECTS = (
    "person man woman child boy girl dog cat horse bird cow sheep elephant bear zebra giraffe car bus truck "
    "train bicycle motorcycle airplane boat traffic light stop sign bench chair couch bed table toilet tv laptop "
    "mouse keyboard phone book clock vase scissors bottle cup fork knife spoon bowl banana apple sandwich orange "
    "pizza donut cake umbrella backpack handbag tie suitcase kite skateboard surfboard tennis racket frisbee "
    "ball tree flower grass building window door road street sky cloud water river mountain beach field wall "
    "floor plate food shirt hat glasses picture sign letter number word circle square triangle line shape"
).split()
_COLORS = "red green blue yellow black white brown gray orange purple pink dark light bright".split()
_PLACES = "left right top bottom middle center front back corner edge background foreground".split()
_COMMON_WORDS = (
    "the a an of in on at to from with without and or but not is are was were be been being has have had do "
    "does did can could will would should may might must this that these those there here what which who whom "
    "whose where when why how many much more most some any all each every both few other another same different "
    "one two three four five six seven eight nine ten first second third last next above below under over near "
    "far behind beside between inside outside up down out off into onto around through during before after "
    "image picture photo scene view shown visible seen looks look looking appears appear appearing holding "
    "wearing standing sitting walking riding playing eating drinking using reading writing showing doing "
    "large small big little tall short long old new young happy sad open closed full empty hot cold wet dry "
    "yes no true false answer question option choice choices letter directly single word phrase given using "
    "please describe detail details explain reason because therefore correct best following statement about "
    "it its they them their he him his she her we us our you your i me my people thing things time year day "
    "way part place kind type color colors size number count total text title name type object objects"
).split()


def _tokenizer_corpus() -> list[str]:
    """Sentences covering vicuna_v1 prompts and the benchmarks' question styles; deterministic."""
    lines = [
        _VICUNA_SYSTEM,
        f"{_VICUNA_SYSTEM} USER: <image>\nWhat is shown in the image? ASSISTANT:",
        _SHORT_ANSWER,
        _OPTION_LETTER,
        "Please answer yes or no.",
        "Describe this image in detail.",
        "What is written on the sign?",
        "Hint: Please answer the question and provide the correct option letter at the end.",
        "Question: Which of the following statements is true about the image?",
        "Options: A. yes B. no",
        "USER: ASSISTANT: USER: ASSISTANT:",
        "Yes", "No", "yes", "no", "Yes.", "No.",
        " ".join(_COMMON_WORDS),
        " ".join(str(i) for i in range(0, 1000, 7)),
        "0123456789 3.14 2024 100% $5 #1 (A) [B] {C} 'D' \"E\" e.g. i.e. etc. :; ,.!? - _ / \\ + = * & @",
    ]
    letters = "ABCD"
    for i, obj in enumerate(_OBJECTS):
        color = _COLORS[i % len(_COLORS)]
        place = _PLACES[i % len(_PLACES)]
        other = _OBJECTS[(i * 7 + 3) % len(_OBJECTS)]
        lines += [
            f"Is there a {obj} in the image? {_SHORT_ANSWER}",
            f"Is there a {color} {obj} in the image? Please answer yes or no.",
            f"What color is the {obj}? {_SHORT_ANSWER}",
            f"How many {obj}s are there in the picture? {_SHORT_ANSWER}",
            f"Where is the {obj} located? The {obj} is at the {place} of the image.",
            f"What is the {obj} next to? It is next to the {color} {other}.",
            f"The {color} {obj} is {place} of the {other}.",
        ]
        options = [_OBJECTS[(i + k * 11) % len(_OBJECTS)] for k in range(4)]
        option_lines = "\n".join(f"{letters[k]}. {options[k]}" for k in range(4))
        lines.append(f"Which object is in the {place} of the image?\n{option_lines}\n{_OPTION_LETTER}")
        lines.append(f"{letters[i % 4]}")
    for n in range(0, 101):
        lines.append(f"There are {n} objects. The answer is {n}.")
    return lines


# Whole-word pieces removed after training, so that the vicuna_v1 system prompt and "USER: " take 35
# tokens (with <s>) as with LLaVA-1.5's tokenizer: the image then starts at index 35, where the official
# RESTORE code assumes it, and the small model can be compared with that code on unchanged prompts.
_PIECES_SPLIT_LIKE_LLAMA = ("\u2581polite", "\u2581USER")


def train_tokenizer_model(vocab_size: int = SmallShapes.tokenizer_vocab_size) -> bytes:
    """Train a LLaMA-style SentencePiece BPE model on the built-in corpus; returns the model bytes.

    Same ids as LLaMA for the specials (unk 0, bos 1, eos 2, no pad), byte fallback, split digits.
    Single-threaded and unshuffled, so the result does not depend on the machine. A few whole-word
    pieces are then removed (see _PIECES_SPLIT_LIKE_LLAMA), so the vocabulary is slightly below vocab_size.
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return _without_pieces(model.getvalue(), _PIECES_SPLIT_LIKE_LLAMA)


def _without_pieces(model_bytes: bytes, pieces: tuple[str, ...]) -> bytes:
    """Remove pieces from a BPE model: words they spelled fall back to the two pieces merged last."""
    # transformers' copy of the proto module, the one LlamaTokenizer uses: importing sentencepiece's own
    # as well would register the same proto file twice and break LlamaTokenizer(legacy=False).
    from transformers.convert_slow_tokenizer import import_protobuf

    model = import_protobuf().ModelProto.FromString(model_bytes)
    present = {p.piece for p in model.pieces}
    missing = [p for p in pieces if p not in present]
    if missing:
        raise RuntimeError(f"the trained tokenizer lacks the pieces {missing}; the corpus or trainer changed")
    kept = [p for p in model.pieces if p.piece not in pieces]
    del model.pieces[:]
    model.pieces.extend(kept)
    model.trainer_spec.vocab_size = len(kept)
    return model.SerializeToString()


def _save_tokenizer(directory: Path, model_bytes: bytes, max_length: int) -> int:
    """Write tokenizer.model + configs the way LLaVA-1.5 ships them; returns the vocabulary size."""
    from transformers import LlamaTokenizer

    vocab_file = directory / "tokenizer.model"
    vocab_file.write_bytes(model_bytes)
    tokenizer = LlamaTokenizer(
        vocab_file=str(vocab_file),
        legacy=False,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.pad_token = tokenizer.unk_token  # LLaVA-1.5 pads with <unk>
    tokenizer.save_pretrained(str(directory))
    return len(tokenizer)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------

def _tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from (seed, tensor name): values do not depend on the order of tensors."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _is_norm(name: str) -> bool:
    return "norm" in name or "layrnorm" in name  # CLIP spells its first norm "pre_layrnorm"


def _vision_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    if _is_norm(name):
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    if name.endswith("bias"):
        std = VISION_BIAS_STD
    elif "q_proj" in name or "k_proj" in name:
        std = VISION_QK_STD
    elif "position_embedding" in name:
        std = VISION_POSITION_STD
    else:
        std = VISION_LINEAR_STD
    return torch.randn(shape, generator=gen) * std


def _llm_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    if _is_norm(name):
        return torch.ones(shape)
    if name.endswith("bias"):  # only the projector has biases
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) * LLM_STD


def _random_state_dict(model: torch.nn.Module, seed: int, prefix: str, draw) -> dict[str, torch.Tensor]:
    """fp16 tensors for every entry of a meta-device model's state dict."""
    return {
        name: draw(name, tensor.shape, _tensor_generator(seed, prefix + name)).to(torch.float16).contiguous()
        for name, tensor in model.state_dict().items()
    }


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})  # transformers refuses files without format


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

def _vision_config(shapes: SmallShapes):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=shapes.vision_hidden_size,
        intermediate_size=shapes.vision_intermediate_size,
        num_hidden_layers=shapes.vision_layers,
        num_attention_heads=shapes.vision_heads,
        image_size=shapes.image_size,
        patch_size=shapes.patch_size,
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=shapes.vision_hidden_size,
        torch_dtype="float16",
    )


def _image_processor(shapes: SmallShapes):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": shapes.image_size},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": shapes.image_size, "width": shapes.image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def _llava_config(shapes: SmallShapes, vocab_size: int, vision_tower: str):
    from llava.model.language_model.llava_llama import LlavaConfig

    return LlavaConfig(
        architectures=["LlavaLlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=shapes.hidden_size,
        intermediate_size=shapes.intermediate_size,
        num_hidden_layers=shapes.num_layers,
        num_attention_heads=shapes.num_heads,
        num_key_value_heads=shapes.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        tie_word_embeddings=False,
        pretraining_tp=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=True,
        torch_dtype="float16",
        # LLaVA-1.5 multimodal settings
        mm_vision_tower=vision_tower,
        mm_hidden_size=shapes.vision_hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        use_mm_proj=True,
        freeze_mm_mlp_adapter=False,
        tune_mm_mlp_adapter=False,
        tokenizer_padding_side="right",
        tokenizer_model_max_length=2048,
    )


def _meta_model(factory):
    """Instantiate a model on the meta device: only names and shapes, no memory, no RNG use."""
    with torch.device("meta"):
        return factory()


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------

def build_small_checkpoint(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    num_layers: int = 4,
    vision_layers: int = 3,
    overwrite: bool = False,
) -> Path:
    """Build a small LLaVA-1.5-shaped checkpoint with random weights into ``out_dir``; returns its path.

    ``out_dir``'s name must contain "llava" (LLaVA's builder chooses the model class by name). The
    config stores the vision tower as an absolute path, so a moved checkpoint must be rebuilt.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if "llava" not in out_dir.name.lower():
        raise ValueError(
            f"checkpoint folder name {out_dir.name!r} must contain 'llava': LLaVA's load_pretrained_model "
            f"decides by the name whether it loads a LLaVA model (e.g. use 'llava-v1.5-small-random')."
        )
    return build_atomically(out_dir, num_layers, vision_layers, overwrite,
                            lambda staging, shapes: write_checkpoint(staging, out_dir, seed, shapes))


def build_atomically(out_dir: Path, num_layers: int, vision_layers: int, overwrite: bool,
                     write: Callable[[Path, SmallShapes], None]) -> Path:
    """Check the sizes, then ``write(staging, shapes)`` into a folder beside ``out_dir`` and rename it into
    place: an interrupted build leaves no half checkpoint. Shared by every small-checkpoint family."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if vision_layers < 2:
        raise ValueError(f"vision_layers must be >= 2 (LLaVA selects the second-to-last layer), got {vision_layers}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; pass overwrite=True to replace it.")

    shapes = SmallShapes(num_layers=num_layers, vision_layers=vision_layers)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        write(staging, shapes)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def write_checkpoint(
    staging: Path, final_dir: Path, seed: int, shapes: SmallShapes, *,
    make_config: Optional[Callable[[SmallShapes, int, str], Any]] = None, max_length: int = 2048,
    manifest: Optional[Dict[str, Any]] = None, manifest_name: str = MANIFEST_NAME,
    check_llm_state: Optional[Callable[[Dict[str, torch.Tensor]], None]] = None,
) -> None:
    """Write a small checkpoint into ``staging``: CLIP tower, tokenizer, LLaVA weights, config, manifest.

    The defaults are LLaVA-1.5's; another family passes its config builder, length limit and manifest.
    """
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from transformers import CLIPVisionModel

    make_config = make_config or _llava_config
    vision_dir = staging / VISION_SUBDIR
    vision_dir.mkdir()
    vision_config = _vision_config(shapes)
    vision_config.save_pretrained(str(vision_dir))
    _image_processor(shapes).save_pretrained(str(vision_dir))
    vision_model = _meta_model(lambda: CLIPVisionModel(vision_config))
    _save_safetensors(_random_state_dict(vision_model, seed, "vision:", _vision_tensor), vision_dir / "model.safetensors")

    vocab_size = _save_tokenizer(staging, train_tokenizer_model(shapes.tokenizer_vocab_size), max_length=max_length)

    # The meta instantiation reads the vision config, which for now lies in the staging folder.
    staging_config = make_config(shapes, vocab_size, str(vision_dir))
    llava_model = _meta_model(lambda: LlavaLlamaForCausalLM(staging_config))
    state = _random_state_dict(llava_model, seed, "llm:", _llm_tensor)
    if check_llm_state is not None:
        check_llm_state(state)
    _save_safetensors(state, staging / "model.safetensors")

    make_config(shapes, vocab_size, str(final_dir / VISION_SUBDIR)).save_pretrained(str(staging))
    if manifest is None:
        manifest = {"recipe_version": RECIPE_VERSION, "seed": seed, "shapes": asdict(shapes)}
    (staging / manifest_name).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def checkpoint_is_current(path: str | os.PathLike, seed: int = 0, *, num_layers: int = 4,
                          vision_layers: int = 3) -> bool:
    """True when ``path`` holds a complete small checkpoint of this recipe, seed and size, usable where it is.

    False for a moved checkpoint (its config points at the vision tower's old absolute path).
    """
    expected = {"recipe_version": RECIPE_VERSION, "seed": seed,
                "shapes": asdict(SmallShapes(num_layers=num_layers, vision_layers=vision_layers))}
    return manifest_is_current(path, MANIFEST_NAME, expected)


def manifest_is_current(path: str | os.PathLike, manifest_name: str, expected: Dict[str, Any]) -> bool:
    """The folder's manifest equals ``expected``, its config points at its own vision tower, its files exist."""
    path = Path(path).expanduser().resolve()
    try:
        manifest = read_json(path / manifest_name)
        config = read_json(path / "config.json")
    except (OSError, ValueError):
        return False
    required = ["model.safetensors", "tokenizer.model", f"{VISION_SUBDIR}/model.safetensors"]
    return (
        manifest == expected
        and config.get("mm_vision_tower") == str(path / VISION_SUBDIR)
        and all((path / name).is_file() for name in required)
    )


def ensure_small_checkpoint(path: str | os.PathLike = DEFAULT_CHECKPOINT_DIR, seed: int = 0, *, num_layers: int = 4,
                            vision_layers: int = 3) -> Path:
    """Reuse the checkpoint at ``path`` if it is current, otherwise (re)build it."""
    if checkpoint_is_current(path, seed, num_layers=num_layers, vision_layers=vision_layers):
        return Path(path).expanduser().resolve()
    return build_small_checkpoint(path, seed, num_layers=num_layers, vision_layers=vision_layers, overwrite=True)


def checkpoint_size_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------------------------------

def synthetic_image(seed: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A deterministic RGB image with structure: a colour gradient, stripes and a few filled shapes.

    Different seeds give different layouts, so features, attention and outputs differ between images.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    start, end = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = (xs * np.cos(angle) + ys * np.sin(angle))
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
    pixels = start + (end - start) * ramp[..., None]
    period = rng.uniform(12, 60)
    stripes = 25 * np.sin(2 * np.pi * (xs * np.sin(angle) - ys * np.cos(angle)) / period)
    pixels = np.clip(pixels + stripes[..., None], 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")

    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, x1 = sorted(rng.uniform(0, width, size=2))
        y0, y1 = sorted(rng.uniform(0, height, size=2))
        box = [x0, y0, max(x1, x0 + 8), max(y1, y0 + 8)]
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.rectangle(box, fill=color)
        elif kind == 1:
            draw.ellipse(box, fill=color)
        else:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) / 2, box[1]), (box[2], box[3])], fill=color)
    return image


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # a prefix of a flag is not that flag
        prog="python -m restore.small_checkpoint",
        description="Build a small LLaVA-1.5-shaped checkpoint with deterministic random weights.",
    )
    parser.add_argument("--out", default=str(DEFAULT_CHECKPOINT_DIR), help="output folder (name must contain 'llava')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, default=4, help="LLM decoder layers")
    parser.add_argument("--vision-layers", type=int, default=3,
                        help="CLIP layers (3: the select layer is the 2nd; ToMe needs 6 or more to reach 64 tokens)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    try:
        path = build_small_checkpoint(args.out, args.seed, num_layers=args.num_layers, vision_layers=args.vision_layers,
                                      overwrite=args.overwrite)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    size_mib = checkpoint_size_bytes(path) / 2**20
    print(f"built {path} (seed {args.seed}) in {seconds:.1f} s, {size_mib:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
