"""A small Qwen2.5-VL-shaped checkpoint with random weights, built locally and deterministically.

    python -m qwen_patches.small_checkpoint --out playground/checkpoints/qwen2.5-vl-small-random --seed 0

The shapes that decide how visual tokens are made and placed are Qwen2.5-VL-7B-Instruct's: 14 px patches,
2 x 2 spatial merge (one visual token per 28 x 28 px), temporal patch 2, window attention with full-attention
blocks between, M-RoPE with rope theta 1e6 and ``mrope_section`` [16, 24, 24] scaled down with the head
dimension (128 -> 32: [4, 6, 6], the same 1/4 : 3/8 : 3/8 shares), the special tokens and chat format of the
Instruct model. Widths, depths and the vocabulary are tiny, and images are small (the image processor
resizes to between 4 and 64 visual tokens), so that a test runs in seconds on a CPU. The weights mean
nothing; the checkpoint exists to test loading, positions and reduction against transformers itself.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# The chat format of Qwen2.5-VL-Instruct, restated (a system turn, the user turn with each image as
# <|vision_start|><|image_pad|><|vision_end|> before its text, the assistant turn opened).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen2.5-VL-7B-Instruct's layout, scaled down (see the module docstring).
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, hidden_act="silu",
            tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096, max_window_layers=2)
VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, out_hidden_size=64,
              patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
              fullatt_block_indexes=[1, 3], tokens_per_second=2, hidden_act="silu")
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 64 * 28 * 28
# Random weights drawn larger than transformers' 0.02 init, so that different inputs give different tokens.
INIT_STD = 0.08
# The vision blocks' q/k/v projections larger still: attention then is peaked as in a trained encoder, not
# nearly uniform, and attention-ranked selections (VisPruner) have gaps well above float rounding.
QKV_STD = 0.3


def _corpus() -> list[str]:
    words = ("the a an is are of in on at to and or what which how many color colour picture image photo "
             "shows left right top bottom person people man woman dog cat car red blue green yellow black white "
             "yes no answer question describe number one two three four five there this that with from "
             "Answer the question using a single word or phrase. Please describe the image briefly.").split()
    lines = [" ".join(words[i:i + 9]) for i in range(0, len(words), 3)]
    lines += [f"{w.capitalize()}? {w}." for w in words]
    lines += ["A B C D E 0 1 2 3 4 5 6 7 8 9 ( ) , . : ; ' \" ? ! - \n"]
    return lines * 4


def build_tokenizer():
    """A byte-level BPE tokenizer (as Qwen2's) with Qwen2.5-VL's special tokens, trained on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, errors="replace", model_max_length=4096,
                                   clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = 64 * ((len(tokenizer) + 63) // 64)
    config = Qwen2_5_VLConfig(
        text_config=dict(TEXT, vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(VISION),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False, torch_dtype="float32",
    )
    config._attn_implementation = "sdpa"
    return config


def build_image_processor():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=VISION["patch_size"],
                                 temporal_patch_size=VISION["temporal_patch_size"],
                                 merge_size=VISION["spatial_merge_size"])


def build_model(config, seed: int):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                std = QKV_STD if name.startswith("model.visual.blocks") and "attn.qkv" in name else INIT_STD
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def build(out: str | Path, seed: int = 0) -> Path:
    """Write the checkpoint folder (config, safetensors weights, tokenizer, image processor); returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    model = build_model(config, seed)
    # Generation defaults shaped like the released Instruct model's: sampling on, a repetition penalty, and
    # both end tokens, so that the entry points are tested on a checkpoint whose defaults greedy runs override.
    ids = tokenizer.get_vocab()
    model.generation_config.update(do_sample=True, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05,
                                   eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    build_image_processor().save_pretrained(str(out))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="playground/checkpoints/qwen2.5-vl-small-random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.out, args.seed))


if __name__ == "__main__":
    main()
