"""llava_patches.loading: one device and dtype for the whole model, clear errors before loading weights."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from llava_patches import loading
from llava_patches.loading import CheckpointError, check_checkpoint, load_model, make_inputs


def _all_tensors(model: torch.nn.Module):
    yield from model.parameters()
    # RoPE frequencies and tables stay float32 by design (see loading.rebuild_rope_tables).
    yield from (b for name, b in model.named_buffers() if not name.endswith(("inv_freq", "cos_cached", "sin_cached")))


def _assert_whole_model_on(model, dtype: torch.dtype, device: str = "cpu") -> None:
    """LLM and projector in ``dtype``, the CLIP tower in float32 (as LLaVA's evaluation leaves it), one device."""
    vision_tower = model.get_vision_tower().vision_tower
    tower_ids = {id(t) for t in _all_tensors(vision_tower)}
    language_model = [t for t in _all_tensors(model) if id(t) not in tower_ids]
    for tensors, expected in ((language_model, dtype), (list(_all_tensors(model.get_model().mm_projector)), dtype),
                              (list(_all_tensors(vision_tower)), torch.float32)):
        float_tensors = [t for t in tensors if t.is_floating_point()]
        assert float_tensors
        assert {t.dtype for t in float_tensors} == {expected}
        assert {t.device.type for t in float_tensors} == {device}
    assert model.get_vision_tower().dtype == torch.float32
    assert not any(module.training for module in model.modules())


def test_load_model_cpu_defaults_to_fp32(small_model):
    _assert_whole_model_on(small_model.model, torch.float32)


@pytest.mark.parametrize(
    "dtype, expected, attn_implementation",
    [("fp16", torch.float16, None), ("bfloat16", torch.bfloat16, "eager")],
)
def test_load_model_half_precision_on_cpu(small_checkpoint, small_model, make_inputs, synthetic_image, dtype,
                                          expected, attn_implementation):
    if expected == torch.float16:
        with pytest.warns(UserWarning, match="float16 on the CPU"):
            tokenizer, model, image_processor, _ = load_model(small_checkpoint, device="cpu", dtype=dtype)
    else:
        tokenizer, model, image_processor, _ = load_model(small_checkpoint, device="cpu", dtype=dtype,
                                                          attn_implementation=attn_implementation)
        assert model.config._attn_implementation == attn_implementation
    _assert_whole_model_on(model, expected)
    # The stored fp16 weights convert exactly, and the half model runs end to end.
    reference = small_model.model.get_model().mm_projector[0].weight
    assert torch.equal(model.get_model().mm_projector[0].weight.float(), reference.to(expected).float())
    image = synthetic_image(0)
    ids, images = make_inputs(tokenizer, image_processor, "What is this?", image, model_config=model.config,
                              dtype=expected)
    with torch.inference_mode():
        hidden = model(input_ids=ids, images=images, image_sizes=[image.size], output_hidden_states=True).hidden_states
    assert hidden[-1].dtype == expected and torch.isfinite(hidden[-1]).all()


def test_resolve_dtype_and_device():
    assert loading.resolve_dtype("auto", "cpu") == torch.float32
    assert loading.resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16
    for name, dtype in [("float32", torch.float32), ("fp32", torch.float32), ("float16", torch.float16),
                        ("fp16", torch.float16), ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16)]:
        assert loading.resolve_dtype(name, "cpu") == dtype
    assert loading.resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        loading.resolve_dtype("float8", "cpu")
    with pytest.raises(ValueError, match="not supported"):
        loading.resolve_dtype(torch.int8, "cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loading.resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            loading.resolve_device("cuda")


# ---------------------------------------------------------------------------------------------
# Errors, all raised from the config before any weights are read
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fail the test if LLaVA's builder is reached."""
    import llava.model.builder

    def refuse(*args, **kwargs):
        raise AssertionError("load_pretrained_model was called although the checkpoint is invalid")

    monkeypatch.setattr(llava.model.builder, "load_pretrained_model", refuse)


def _config_only_checkpoint(small_checkpoint: Path, folder: Path, **changes) -> Path:
    folder.mkdir(parents=True)
    config = json.loads((small_checkpoint / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.usefixtures("no_weight_loading")
def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere" / "llava-v1.5-7b", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("llava-v1.5-7b-not-here", device="cpu")


@pytest.mark.usefixtures("no_weight_loading")
def test_unreachable_hub_name():
    # conftest sets HF_HUB_OFFLINE, so an uncached hub name cannot be fetched.
    with pytest.raises(FileNotFoundError, match="no-such-owner/llava-nothing"):
        load_model("no-such-owner/llava-nothing", device="cpu")


@pytest.mark.usefixtures("no_weight_loading")
def test_folder_without_config(tmp_path):
    (tmp_path / "llava-empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "llava-empty", device="cpu")


@pytest.mark.usefixtures("no_weight_loading")
@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mm_vision_tower": None}, "no 'mm_vision_tower'"),
        ({"mm_vision_tower": None, "model_type": "llava", "vision_config": {}}, "transformers-format LLaVA"),
        ({"model_type": "llava_mistral"}, "only LLaVA-Llama"),
        ({"model_type": "llama"}, "only LLaVA-Llama"),
        ({"mm_vision_tower": "/moved/away/vision_tower"}, "fix 'mm_vision_tower'"),
    ],
)
def test_config_that_is_not_llava_llama(small_checkpoint, tmp_path, changes, message):
    folder = _config_only_checkpoint(small_checkpoint, tmp_path / "llava-broken", **changes)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder, device="cpu")


@pytest.mark.usefixtures("no_weight_loading")
def test_name_must_say_llava(small_checkpoint, tmp_path):
    folder = _config_only_checkpoint(small_checkpoint, tmp_path / "v1.5-small-random")
    with pytest.raises(CheckpointError, match="Rename the folder"):
        load_model(folder, device="cpu")
    folder = _config_only_checkpoint(small_checkpoint, tmp_path / "llava-mistral-copy")
    with pytest.raises(CheckpointError, match="contains 'mistral'"):
        load_model(folder, device="cpu")


@pytest.mark.usefixtures("no_weight_loading")
def test_bad_arguments(small_checkpoint):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(small_checkpoint, device="cpu", dtype="int4")
    with pytest.raises(ValueError, match="attn_implementation"):
        load_model(small_checkpoint, device="cpu", attn_implementation="fast")


def test_relative_path_resolves_to_the_folder_name(small_checkpoint, monkeypatch):
    monkeypatch.chdir(small_checkpoint)
    path, name, config = check_checkpoint(".")
    assert Path(path) == small_checkpoint and name == small_checkpoint.name
    assert config["model_type"] == "llava_llama"


def test_copied_checkpoint_with_fixed_name_loads(small_checkpoint, tmp_path, small_model):
    """A checkpoint folder copied elsewhere loads as long as its name contains 'llava'."""
    copy = tmp_path / "LLaVA-copy"
    shutil.copytree(small_checkpoint, copy)
    _, model, _, _ = load_model(copy, device="cpu")
    assert torch.equal(model.lm_head.weight, small_model.model.lm_head.weight)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def test_make_inputs_matches_llava_eval(small_model, synthetic_image):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    tokenizer, model, image_processor = small_model
    image = synthetic_image(5, size=(400, 200))
    question = "Is there a cat in the image?\nAnswer the question using a single word or phrase."
    input_ids, images = make_inputs(tokenizer, image_processor, question, image, model_config=model.config)

    conversation = conv_templates["vicuna_v1"].copy()
    conversation.append_message(conversation.roles[0], "<image>\n" + question)
    conversation.append_message(conversation.roles[1], None)
    expected_ids = tokenizer_image_token(conversation.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    assert input_ids.shape == (1, expected_ids.shape[0])
    assert torch.equal(input_ids[0], expected_ids)
    assert (input_ids == IMAGE_TOKEN_INDEX).sum() == 1
    assert images.shape == (1, 3, 336, 336) and images.dtype == torch.float32
    assert torch.equal(images, process_images([image], image_processor, model.config))
    # "pad": a 2:1 image is padded to a square with the CLIP mean, which normalises to zero.
    assert images[0, :, :60].abs().max() < 0.02
    assert images[0, :, 150:190].abs().max() > 0.5

    other_template_ids, _ = make_inputs(tokenizer, image_processor, question, image, conv_mode="llava_v1")
    assert not torch.equal(other_template_ids, input_ids)
    with pytest.raises(ValueError, match="unknown conv_mode"):
        make_inputs(tokenizer, image_processor, question, image, conv_mode="vicuna_v9")


def test_make_inputs_moves_and_casts(small_model, synthetic_image, tmp_path):
    tokenizer, _, image_processor = small_model
    path = tmp_path / "picture.png"
    synthetic_image(6).save(path)
    input_ids, images = make_inputs(tokenizer, image_processor, "What is this?", path, device="cpu",
                                    dtype=torch.bfloat16)
    assert input_ids.dtype == torch.long and images.dtype == torch.bfloat16


def test_rope_tables_are_exact_float32(small_model):
    """The builder loads under fp16; load_model rebuilds RoPE tables so fp32 runs are not fp16-rounded."""
    rope = small_model.model.get_model().layers[0].self_attn.rotary_emb
    positions = torch.arange(rope.max_seq_len_cached, dtype=torch.float32)
    angles = torch.outer(positions, rope.inv_freq.float())
    expected = torch.cat([angles, angles], dim=-1).cos()
    assert rope.cos_cached.dtype == torch.float32 and rope.inv_freq.dtype == torch.float32
    assert torch.equal(rope.cos_cached, expected)


# ---------------------------------------------------------------------------------------------
# Numerics as in LLaVA's evaluation (issue 8, items 12 and 13)
# ---------------------------------------------------------------------------------------------

def _stock_builder(path, device: str = "cpu"):
    """LLaVA's builder called as its evaluation calls it (device_map="auto"), on ``device``."""
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(str(path), None, get_model_name_from_path(str(path)), device=device)


def test_fp16_load_equals_llava_builder(small_checkpoint, make_inputs, synthetic_image):
    """fp16: the tower stays float32 like the builder's, and every logit equals the builder's model's."""
    tokenizer, stock, processor, _ = _stock_builder(small_checkpoint)
    with pytest.warns(UserWarning, match="float16 on the CPU"):
        _, ours, _, _ = load_model(small_checkpoint, device="cpu", dtype="fp16")
    assert stock.get_vision_tower().dtype == torch.float32
    assert ours.get_vision_tower().dtype == stock.get_vision_tower().dtype
    stock_rope, our_rope = (m.get_model().layers[0].self_attn.rotary_emb for m in (stock, ours))
    for name in ("inv_freq", "cos_cached", "sin_cached"):
        stock_buffer, our_buffer = getattr(stock_rope, name), getattr(our_rope, name)
        assert our_buffer.dtype == stock_buffer.dtype and torch.equal(our_buffer, stock_buffer), name
    image = synthetic_image(1)
    ids, images = make_inputs(tokenizer, processor, "What is this?", image, model_config=ours.config,
                              dtype=torch.float16)
    with torch.inference_mode():
        expected = stock(input_ids=ids, images=images, image_sizes=[image.size]).logits
        assert torch.equal(ours(input_ids=ids, images=images, image_sizes=[image.size]).logits, expected)


class _RecordCos(torch.overrides.TorchFunctionMode):
    """Records (device type, dtype) of every cos/sin computed while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cos, torch.Tensor.sin, torch.cos, torch.sin):
            self.calls.append((args[0].device.type, args[0].dtype))
        return func(*args, **(kwargs or {}))


def test_rope_tables_are_built_on_the_cpu_whatever_the_device():
    """Stock LLaVA computes its table on the CPU at init, also when the model then runs on a GPU;
    a module on another device (meta stands in for a GPU here) must not compute it there."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    holder = torch.nn.Module()
    holder.rope = LlamaRotaryEmbedding(8, max_position_embeddings=16).to(device="meta", dtype=torch.float16)
    recorder = _RecordCos()
    with recorder:
        loading.rebuild_rope_tables(holder, dtype=torch.float16)
    assert recorder.calls and set(recorder.calls) == {("cpu", torch.float32)}
    rope = holder.rope
    assert rope.inv_freq.device.type == "meta" and rope.inv_freq.dtype == torch.float32
    assert rope.cos_cached.device.type == "meta" and rope.cos_cached.dtype == torch.float16


def test_model_base_loads_through_the_same_path(small_checkpoint, small_model, tmp_path, make_inputs, synthetic_image):
    """A projector-only checkpoint on top of --model-base: same tower dtype and RoPE tables as load_model's."""
    from safetensors.torch import load_file

    projector_only = tmp_path / "llava-small-projector"
    projector_only.mkdir()
    shutil.copy(small_checkpoint / "config.json", projector_only / "config.json")
    weights = load_file(str(small_checkpoint / "model.safetensors"))
    torch.save({k: v for k, v in weights.items() if "mm_projector" in k}, projector_only / "mm_projector.bin")

    tokenizer, model, processor, _ = load_model(projector_only, model_base=small_checkpoint, device="cpu")
    _assert_whole_model_on(model, torch.float32)
    rope, reference = (m.get_model().layers[0].self_attn.rotary_emb for m in (model, small_model.model))
    assert torch.equal(rope.cos_cached, reference.cos_cached) and rope.cos_cached.dtype == torch.float32
    image = synthetic_image(2)
    ids, images = make_inputs(tokenizer, processor, "What is this?", image, model_config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, images=images, image_sizes=[image.size]).logits
        expected = small_model.model(input_ids=ids, images=images, image_sizes=[image.size]).logits
    assert torch.equal(logits, expected)


@pytest.mark.usefixtures("no_weight_loading")
def test_missing_model_base(small_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(small_checkpoint, model_base=tmp_path / "no-base", device="cpu")


# ---------------------------------------------------------------------------------------------
# Corrupt weights (issue 8, item 10): a clear error naming the file, before loading
# ---------------------------------------------------------------------------------------------

def _copy_without_weights(small_checkpoint: Path, folder: Path) -> Path:
    shutil.copytree(small_checkpoint, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


@pytest.mark.usefixtures("no_weight_loading")
@pytest.mark.parametrize("name, content", [
    ("model.safetensors", "truncated"),
    ("model.safetensors", b"not a safetensors file"),
    ("pytorch_model.bin", b"<html>404</html>"),
    ("pytorch_model.bin", "truncated"),
])
def test_corrupt_weights_file_is_named(small_checkpoint, tmp_path, name, content):
    folder = _copy_without_weights(small_checkpoint, tmp_path / "llava-corrupt")
    target = folder / name
    if content == "truncated":
        if name.endswith(".bin"):
            torch.save({"w": torch.zeros(1000)}, target)
        else:
            shutil.copy(small_checkpoint / "model.safetensors", target)
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"weights file {re.escape(str(target))} is corrupt or incomplete"):
        load_model(folder, device="cpu")


@pytest.mark.usefixtures("no_weight_loading")
def test_missing_weight_shard_is_named(small_checkpoint, tmp_path):
    folder = _copy_without_weights(small_checkpoint, tmp_path / "llava-sharded")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(folder, device="cpu")


def test_complete_bin_weights_pass_the_check(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "pytorch_model.bin")
    loading.check_weight_files(tmp_path)
