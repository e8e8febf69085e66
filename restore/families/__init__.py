"""Model families behind one seam: what restore needs to know about a kind of model, and the registry
that finds a model's family.

The core (selectors, merging, calibration, settings, ``restore.apply``) never imports model code: it asks
the family of the model in hand. A family is one folder (LLaVA, with LLaVA-1.5 and its anyres layouts:
``llava_patches/``) holding a :class:`ModelFamily` subclass, registered by one line in
:data:`FAMILY_MODULES` or by :func:`register_family` from a plugin. docs/model_families.md describes the
interface with the LLaVA family as the worked example.

Each family runs in the environment of its own library: the LLaVA family needs llava-torch and
transformers 4.37.2 (``.venv``), the Qwen2.5-VL family (``qwen_patches/``) a newer transformers
(``.venv-qwen``). A family whose dependencies do not import here is left out of :func:`families` and
listed, with the reason, by :func:`unavailable_families`; a checkpoint of such a family is refused with
that reason (which environment to use).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

# Registration: module that defines FAMILY, one line per family.
FAMILY_MODULES = ("llava_patches.family", "qwen_patches.family")
# Modules a family needs beyond its own folder, checked (without importing them) before the family is used;
# a family may also say what is missing itself (ModelFamily.unavailable_reason).
FAMILY_REQUIRES: Dict[str, Tuple[str, ...]] = {"llava_patches.family": ("llava",)}


class CheckpointError(ValueError):
    """A checkpoint no family can load as it is; the message says why and what to change."""


class LoadedModel(NamedTuple):
    tokenizer: Any
    model: Any
    image_processor: Any
    model_name: str  # the name the family's own evaluation code gives the checkpoint (answer lines' model_id)


class ModelFamily:
    """One kind of multimodal model: how to recognise, load, prompt and patch it.

    The methods fall in two groups. ``restore.apply`` uses :meth:`recognizes_model`, :meth:`check_model`,
    :meth:`check_settings` and :meth:`patch_targets`; the evaluation entry points use the checkpoint and
    prompt methods, so that nothing outside the family folder names the family's classes or templates.
    """

    name: str = ""
    default_conv_mode: str = ""
    # Whether images have different visual-token counts (Qwen2.5-VL: one per 28 x 28 px). Such a family
    # takes a budget given as a share (``keep``) per image; for the others a share is the count it is of N.
    varying_token_counts: bool = False
    # The benchmark text its models are evaluated with (restore.eval.prompt_styles): LLaVA's question files,
    # or lmms-eval's task prompts (the protocol of the paper's Qwen2.5-VL numbers).
    default_prompt_style: str = "llava"

    def budget(self, n_vis: Optional[int], keep: Optional[float], num_patches: int) -> Tuple[Optional[int], Optional[float]]:
        """(n_vis, keep) as this family's reduction takes them: a share stays a share where token counts
        vary, and is round(keep * N) tokens where every image has N."""
        if keep is None:
            return n_vis, None
        if n_vis is not None:
            raise ValueError("give the budget as keep (a share of each image's visual tokens) or n_vis (a count), "
                             "not both")
        from restore.settings import check_share, count_of_share

        return (None, check_share(keep)) if self.varying_token_counts else (count_of_share(keep, num_patches), None)

    def unavailable_reason(self) -> Optional[str]:
        """None when this family's dependencies import in the running environment; otherwise what is
        missing and which environment has it (the family then is skipped by :func:`families`)."""
        return None

    # ---- recognising ------------------------------------------------------------------------------
    def recognizes_config(self, config: Mapping[str, Any]) -> bool:
        """Whether a checkpoint's config.json is one of this family's (no weights read)."""
        raise NotImplementedError

    def recognizes_model(self, model: Any) -> bool:
        """Whether a loaded model is one of this family's."""
        raise NotImplementedError

    # ---- restore.apply ----------------------------------------------------------------------------
    def check_model(self, model: Any) -> int:
        """Raise (TypeError/ValueError, saying what to change) unless ``model`` can be patched; return N,
        its visual tokens per image before reduction."""
        raise NotImplementedError

    def check_settings(self, model: Any, settings: Any) -> None:
        """Raise ValueError for a reduction this model cannot carry out (e.g. a budget its encoder cannot reach)."""

    def patch_targets(self, model: Any) -> Iterable[Tuple[Any, type]]:
        """(module, mixin) pairs: ``restore.apply`` swaps each module's class for mixin + its class."""
        raise NotImplementedError

    def new_context(self, settings: Any) -> Any:
        """The state the patched modules of one model share (``module._restore_ctx``); it must hold the
        settings as ``.settings``."""
        raise NotImplementedError

    # ---- checkpoints and evaluation ---------------------------------------------------------------
    def check_checkpoint(self, model_path: str) -> Mapping[str, Any]:
        """Validate a checkpoint from its config (and weight headers) before loading it; its config.
        FileNotFoundError for a missing one, CheckpointError for one this family cannot load."""
        raise NotImplementedError

    def visual_tokens_per_image(self, config: Mapping[str, Any]) -> int:
        """N for a checkpoint (the budget's upper end), from its config."""
        raise NotImplementedError

    def check_budget(self, model_path: str, settings: Any) -> None:
        """ValueError for a reduction this checkpoint cannot carry out, from its config alone."""

    def execution(self, device: str, dtype: str) -> Tuple[Any, Any]:
        """(torch device, torch dtype) that :meth:`load` gives ``device`` / ``dtype`` ("auto": the family's
        own choice on this machine); ValueError for a device that is not here."""
        raise NotImplementedError

    def image_protocol(self, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                       jpeg_quality: Optional[int] = None) -> Optional[Dict[str, int]]:
        """How an evaluation prepares images beyond the checkpoint's processor, for a family whose protocol
        says more (Qwen2.5-VL: the pixel range images are resized into, a JPEG re-encoding); each value given
        replaces the protocol's. None (and ValueError when a value is given) for a family that has none (LLaVA)."""
        given = [flag for flag, value in (("--min-pixels", min_pixels), ("--max-pixels", max_pixels),
                                          ("--jpeg-quality", jpeg_quality)) if value is not None]
        if given:
            raise ValueError(f"{self.name} resizes every image to its encoder's fixed size: {', '.join(given)} "
                             f"{'does' if len(given) == 1 else 'do'} not apply")
        return None

    def load(self, model_path: str, *, model_base: Optional[str], device: str, dtype: str,
             image_protocol: Optional[Mapping[str, int]] = None) -> LoadedModel:
        """Tokenizer, model and image processor; ``image_protocol`` (from :meth:`image_protocol`) makes the
        image processor follow it."""
        raise NotImplementedError

    def model_name(self, model_path: str) -> str:
        raise NotImplementedError

    def conv_modes(self) -> List[str]:
        """The conversation templates --conv-mode may name."""
        raise NotImplementedError

    def effective_conv_mode(self, model_path: str, conv_mode: str) -> str:
        """The template a run with ``conv_mode`` uses for this checkpoint."""
        return conv_mode

    def prompt_ids(self, tokenizer: Any, text: str, has_image: bool, conv_mode: str, model_config: Any) -> Any:
        """Token ids [L] of the full prompt of one question (the image placeholder where the family puts it)."""
        raise NotImplementedError

    def preprocess_image(self, image: Any, image_processor: Any, model_config: Any, settings: Any = None) -> Any:
        """Pixels of one image as inference feeds them to a model carrying ``settings`` (a ReductionSettings;
        None: unreduced). A family whose reduced layout needs other pixels (LLaVA-NeXT's fixed grid) decides
        here."""
        raise NotImplementedError

    def preprocessing_key(self, model_config: Any, settings: Any) -> Any:
        """Configurations whose keys are equal get the same pixels (and may share one encoding in a sweep)."""
        return None

    def preprocessing_for_check(self, model_path: str, settings: Any = None,
                                image_protocol: Optional[Mapping[str, int]] = None) -> Callable[[Any], Any]:
        """``image -> pixels`` as inference will preprocess for a model carrying ``settings``, built
        without loading weights."""
        raise NotImplementedError

    def shared_encoding(self, model: Any) -> ContextManager[Any]:
        """A context whose memo (``memo.encode(images)``) gives every configuration applied meanwhile the
        same encoding of a batch's images (sweeps)."""
        raise NotImplementedError

    # ---- generation (the evaluation runner) -------------------------------------------------------
    def pixels_dtype(self, model: Any) -> Any:
        """The dtype a batch's pixels are cast to before they reach the model."""
        raise NotImplementedError

    def batch_images(self, pixels: Any, device: Any, dtype: Any) -> Any:
        """One batch's preprocessed images (``preprocess_image`` outputs, in row order) on the model's
        device, as :meth:`generate` takes them; None for a batch without images. The runner picks rows of
        it with ``images[list(rows)]`` (a tensor) or by index (a list)."""
        raise NotImplementedError

    def generate(self, model: Any, tokenizer: Any, prompts: Sequence[Any], images: Any, image_sizes: Sequence[Any],
                 **generate_kwargs: Any) -> Any:
        """Token ids [B, T] of the answers to a batch: ``prompts`` are the rows' :meth:`prompt_ids`, ``images``
        the rows' :meth:`batch_images` (None: no image), ``image_sizes`` the original (w, h) of each image;
        ``generate_kwargs`` go to the model's generate (num_beams, max_new_tokens, sampling...). Only the
        generated tokens, not the prompt; a row that ended early may be padded after its end token."""
        raise NotImplementedError


_FAMILIES: Dict[str, ModelFamily] = {}
# FAMILY_MODULES entries that cannot run here: module -> (the family, if its module imported; the reason).
_UNAVAILABLE: Dict[str, Tuple[Optional[ModelFamily], str]] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    known = _FAMILIES.get(family.name)
    if known is not None and known is not family:
        raise ValueError(f"a model family named {family.name!r} is registered already")
    _FAMILIES[family.name] = family
    return family


def _missing_requirement(module: str) -> Optional[str]:
    import importlib.util

    for required in FAMILY_REQUIRES.get(module, ()):
        try:
            found = importlib.util.find_spec(required) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"{required!r} is not installed in this environment"
    return None


def _load_family_modules() -> None:
    for module in FAMILY_MODULES:
        if module in _UNAVAILABLE:
            continue
        try:
            family = importlib.import_module(module).FAMILY
        except ImportError as error:
            _UNAVAILABLE[module] = (None, f"{module} does not import here: {error}")
            continue
        if family.name in _FAMILIES:
            continue
        reason = _missing_requirement(module) or family.unavailable_reason()
        if reason is not None:
            _UNAVAILABLE[module] = (family, reason)
            continue
        register_family(family)


def families() -> List[ModelFamily]:
    """The families that can run in this environment (see :func:`unavailable_families` for the others)."""
    _load_family_modules()
    return list(_FAMILIES.values())


def unavailable_families() -> Dict[str, str]:
    """The registered families that cannot run in this environment: name (or module) -> why, and where to run them."""
    _load_family_modules()
    return {(family.name if family is not None else module): reason
            for module, (family, reason) in _UNAVAILABLE.items()}


def _unavailable_recognizing(config: Mapping[str, Any]) -> Optional[str]:
    """The reason of an unavailable family that recognises ``config`` (its checkpoint needs another environment)."""
    for family, reason in _UNAVAILABLE.values():
        if family is None:
            continue
        try:
            recognized = family.recognizes_config(config)
        except Exception:  # a family that cannot even read configs here says nothing
            recognized = False
        if recognized:
            return f"this is a {family.name} checkpoint, which cannot run in this environment: {reason}"
    return None


def family_of_model(model: Any) -> ModelFamily:
    """The family of a loaded model; TypeError naming the supported families otherwise."""
    candidates = families()
    for family in candidates:
        if family.recognizes_model(model):
            return family
    reasons = []
    for family in candidates:  # each family says what it expects
        try:
            family.check_model(model)
        except (TypeError, ValueError) as error:
            reasons.append(str(error))
    raise TypeError(reasons[0] if len(reasons) == 1 else
                    f"restore does not know models of type {type(model).__name__}: " + "; ".join(reasons))


def family_of_checkpoint(model_path: str) -> ModelFamily:
    """The family whose checkpoints look like ``model_path``'s (from its config.json). A checkpoint no
    family recognises gets each family's own explanation of why it cannot load it."""
    config = read_checkpoint_config(model_path)[1]
    candidates = families()
    for family in candidates:
        if family.recognizes_config(config):
            return family
    elsewhere = _unavailable_recognizing(config)
    if elsewhere is not None:
        raise CheckpointError(f"{model_path}: {elsewhere}")
    reasons = []
    for family in candidates:
        try:
            family.check_checkpoint(model_path)
        except (CheckpointError, FileNotFoundError) as error:
            reasons.append(str(error))
    raise CheckpointError(" ".join(reasons) if len(reasons) == 1 else
                          f"{model_path} is not a checkpoint of any supported family: " + "; ".join(reasons))


def is_hub_name(model_path: str) -> bool:
    """'owner/name' that is not a local path (its first component is not a local folder)."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", model_path)) \
        and not Path(model_path.split("/")[0]).exists()


def read_checkpoint_config(model_path: str) -> Tuple[str, Dict[str, Any]]:
    """(the path to load from, absolute for a local folder; the checkpoint's config.json), from a local
    folder or the Hugging Face cache/hub. FileNotFoundError or CheckpointError saying what is wrong."""
    from restore.jsonio import read_json

    local = Path(model_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{model_path} is a file; pass the checkpoint folder (the one with config.json).")
        config_file = local / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{local} has no config.json: it is not a Hugging Face checkpoint folder.")
        return str(local.resolve()), read_json(config_file)
    if not is_hub_name(model_path):
        raise FileNotFoundError(
            f"checkpoint folder {model_path!r} does not exist. Pass an existing local folder or a Hugging Face "
            f"name such as 'liuhaotian/llava-v1.5-7b'."
        )
    from transformers.utils import cached_file

    try:
        config_file = cached_file(model_path, "config.json")
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{model_path!r} is neither a local folder nor a reachable Hugging Face model "
            f"(no config.json; offline, a typo, or a gated repository?): {error}"
        ) from error
    return model_path, read_json(config_file)
