"""Our loading and input path with no reduction is transformers' own Qwen2.5-VL: the same input ids and
pixels as its processor, the same logits and generated tokens as the stock model; a batch of two images of
different sizes gives what each gives alone."""
from __future__ import annotations

import pytest
import torch

import restore
from qwen_patches.inputs import conversation_prompt, visual_tokens_of_grid
from qwen_patches.inputs import build_inputs

QUESTIONS = ["What is in the picture? Answer the question using a single word or phrase.",
             "Please describe the image briefly."]


def reference_processor(checkpoint):
    """transformers' Qwen2_5_VLProcessor over the slow image processor. Its constructor insists on a video
    processor, which needs torchvision (not installed here); __call__ with images only never touches it."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processor = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    processor.tokenizer = tokenizer
    processor.image_processor = Qwen2VLImageProcessor.from_pretrained(checkpoint)
    processor.chat_template = tokenizer.chat_template
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processor.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return processor


def stock_model(checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()


def reference_inputs(processor, question, image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == conversation_prompt(question, True)  # the checkpoint's template is the Instruct format
    return processor(text=[text], images=[image], return_tensors="pt")


def test_inputs_equal_transformers_processor(qwen_checkpoint, qwen_loaded, images):
    tokenizer, model, image_processor, _ = qwen_loaded
    processor = reference_processor(str(qwen_checkpoint))
    for question, image in zip(QUESTIONS, images):
        ref = reference_inputs(processor, question, image)
        ours = build_inputs(tokenizer, image_processor, model.config, [question], [image])
        assert torch.equal(ours["input_ids"], ref["input_ids"])
        assert torch.equal(ours["attention_mask"], ref["attention_mask"])
        assert torch.equal(ours["pixel_values"], ref["pixel_values"])
        assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    # visual tokens = encoder outputs after the 2 x 2 merger: their count follows the image
    counts = [visual_tokens_of_grid(build_inputs(tokenizer, image_processor, model.config, ["q"], [im])
                                    ["image_grid_thw"][0]) for im in images]
    assert counts == [24, 20]


@torch.no_grad()
def test_no_reduction_is_stock_qwen(qwen_checkpoint, qwen_loaded, images):
    tokenizer, model, image_processor, _ = qwen_loaded
    stock = stock_model(str(qwen_checkpoint))
    processor = reference_processor(str(qwen_checkpoint))
    assert restore.apply(model, base=None) is model and not restore.is_applied(model)
    for question, image in zip(QUESTIONS, images):
        ref = reference_inputs(processor, question, image)
        ours = build_inputs(tokenizer, image_processor, model.config, [question], [image])
        assert torch.equal(model(**ours).logits, stock(**ref).logits)
        ref_tokens = stock.generate(**ref, max_new_tokens=8, do_sample=False)
        our_tokens = model.generate(**ours, max_new_tokens=8, do_sample=False)
        assert torch.equal(our_tokens, ref_tokens)
        # the random weights must still tell inputs apart, or the comparison would be empty
        assert len(set(our_tokens[0, ours["input_ids"].shape[1]:].tolist())) > 1


@torch.no_grad()
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_of_two_image_sizes_equals_each_alone(qwen_loaded, images, padding_side):
    tokenizer, model, image_processor, _ = qwen_loaded
    batch = build_inputs(tokenizer, image_processor, model.config, QUESTIONS, images, padding_side=padding_side)
    assert batch["attention_mask"].sum(1).tolist()[0] != batch["attention_mask"].sum(1).tolist()[1]
    logits = model(**batch).logits
    for b, (question, image) in enumerate(zip(QUESTIONS, images)):
        alone = build_inputs(tokenizer, image_processor, model.config, [question], [image])
        alone_logits = model(**alone).logits[0]
        keep = batch["attention_mask"][b].bool()
        torch.testing.assert_close(logits[b][keep], alone_logits, atol=1e-5, rtol=1e-4)
    if padding_side == "left":  # generation pads on the left
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        for b, (question, image) in enumerate(zip(QUESTIONS, images)):
            alone = build_inputs(tokenizer, image_processor, model.config, [question], [image])
            ref = model.generate(**alone, max_new_tokens=8, do_sample=False)
            assert out[b, batch["input_ids"].shape[1]:].tolist() == ref[0, alone["input_ids"].shape[1]:].tolist()


def test_text_only_prompt(qwen_loaded):
    tokenizer, model, image_processor, _ = qwen_loaded
    batch = build_inputs(tokenizer, image_processor, model.config, ["Describe a dog."], [None])
    assert "pixel_values" not in batch and model.config.image_token_id not in batch["input_ids"][0].tolist()
    model.generate(**batch, max_new_tokens=2, do_sample=False)
