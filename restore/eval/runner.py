"""An evaluation run: plan and check (restore.eval.plan), then load the model, reduce, generate, summarise.

Only once every check has passed is the model loaded and the token reduction applied; then one flushed
answer line is appended per item, and at the end the file is put in question order, its settings record
marked complete, and one summary line printed.

Heavy imports (torch, PIL, llava) happen inside functions so that argument errors come back at once.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .answer_files import dumps_line, put_in_question_order, write_in_order, write_meta
from .arguments import build_parser, chunk_source, describe_reduction, effective_conv_mode
from .entry_point import EntryPoint, Item, SetupError
from .plan import Plan, check_images, check_only, plan_runs, progress_interval


def run(entry: EntryPoint, argv: Optional[Sequence[str]] = None) -> int:
    """The whole run of an entry point; an exit status (2: a problem found before the model loaded)."""
    args = build_parser(entry).parse_args(argv)
    if args.check_only:
        return _check_only(entry, args)
    try:
        plans = plan_runs(entry, args)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _run_planned(entry, args, plans)
    finally:
        for plan in plans:
            plan.release()


def _check_only(entry: EntryPoint, args: argparse.Namespace) -> int:
    try:
        n_items = check_only(entry, args)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[{entry.name}] arguments and question file are fine: {n_items} items", flush=True)
    return 0


def _run_planned(entry: EntryPoint, args: argparse.Namespace, plans: Sequence[Plan]) -> int:
    try:
        source = chunk_source(args.num_chunks, args.chunk_idx, os.environ)
        for plan in plans:
            one = plan.args
            print(f"[{entry.name}] {plan.chunk_label}"
                  f"{f' (from {source})' if source else ''}: {len(plan.items)} items, "
                  f"{len(plan.items) - len(plan.pending)} already answered; reduction: "
                  f"{describe_reduction(plan.settings['base'], one.n_vis, one.restore, _overrides(one), one.keep)}",
                  flush=True)
        pending = pending_union(plans)
        # --no-image-check skips only the slow part (decoding); a missing file is always found here
        decode = not args.no_image_check
        needs_pixels = decode and any(item.image is not None for item in pending)
        check_images(pending, decode=decode,
                     preprocess=_preprocessing_of_every_configuration(plans) if needs_pixels else None)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generate_answers(plans)
    return 0


def pending_union(plans: Sequence[Plan]) -> List[Item]:
    """The items some configuration still has to answer, in question order (every plan covers one chunk)."""
    wanted = set().union(*({item.key for item in plan.pending} for plan in plans))
    return [item for item in plans[0].items if item.key in wanted]


def generate_answers(plans: Sequence[Plan]) -> None:
    metas = []
    for plan in plans:
        meta = {"entry": plan.entry.name, "settings": plan.settings, "num_chunks": plan.num_chunks,
                "chunk_idx": plan.chunk_idx, "n_items": len(plan.items), "complete": False,
                # information only, outside the settings a resume compares: the batch does not change the answers
                "batch_size": plan.args.batch_size}
        write_meta(plan.answers_file, meta)
        if plan.repaired or not os.path.exists(plan.answers_file):
            write_in_order(plan.entry, plan.answers_file, plan.items, plan.done)
        metas.append(meta)

    start = time.perf_counter()
    counts = _answer_pending(plans) if any(plan.pending for plan in plans) else [(0, 0.0)] * len(plans)
    wall = time.perf_counter() - start

    for plan, meta, (n_tokens, generation_s) in zip(plans, metas, counts):
        put_in_question_order(plan.entry, plan.answers_file, plan.items)
        write_meta(plan.answers_file, {**meta, "complete": True})
        n_new = len(plan.pending)
        rate = (f"{n_tokens} tokens generated in {generation_s:.1f} s, "
                f"{n_tokens / max(generation_s, 1e-9):.1f} tokens/s" if n_new else "nothing to generate")
        print(f"[{plan.entry.name}] {plan.chunk_label}: {len(plan.items)} items "
              f"({n_new} answered now, {len(plan.items) - n_new} kept from an earlier run) in {wall:.1f} s, {rate}; "
              f"answers: {plan.answers_file}", flush=True)


def shares_encoding(settings) -> bool:
    """Whether a configuration reads the stock select-layer encoding (every one but those that change
    the vision encoder itself, as ToMe)."""
    return settings is None or not settings.merges_itself


def _answer_pending(plans: Sequence[Plan]) -> List[Tuple[int, float]]:
    """Load the model once and answer every plan's pending items; (generated tokens, seconds spent
    generating) per plan.

    Items are generated ``--batch-size`` at a time, in batches planned over the items any configuration
    still needs; within a batch the images are encoded once when several configurations share that
    encoding, then each configuration generates the items it lacks, and its answers are appended and
    flushed together, so that a killed run loses at most the batch it was generating."""
    import torch
    from tqdm import tqdm

    first = plans[0]
    args, entry = first.args, first.entry
    tokenizer, model, image_processor, model_name = load_model_for_eval(args, first.settings["base"])
    conv_mode = effective_conv_mode(args.model_path, args.conv_mode, args.family)  # checked to exist before loading
    if conv_mode != args.conv_mode:
        print(f"{model_name} looks like a plain (pretrain-only) model: using conv mode {conv_mode}")

    device = next(model.parameters()).device
    family = args.family
    dtype = family.pixels_dtype(model)
    union = pending_union(plans)
    keys = [family.preprocessing_key(model.config, plan.args.reduction) for plan in plans]
    variants = {key: plan.args.reduction for key, plan in zip(keys, plans)}
    dataset = PreparedItems(union, tokenizer, image_processor, model.config, conv_mode, family, variants)
    batches = plan_batches(union, args.batch_size, dataset.prompt_length)
    workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_identity)
    # Sampling parameters only when sampling: greedy decoding ignores them (and transformers warns).
    sampling: Dict[str, Any] = {"do_sample": False}
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature}
        if args.top_p is not None:
            sampling["top_p"] = args.top_p
    eos = _eos_ids(model)
    pending_keys = [{item.key for item in plan.pending} for plan in plans]
    counts = [[0, 0.0] for _ in plans]
    applied = 0  # which plan's reduction the model carries
    label = first.chunk_label + (f", {len(plans)} configurations" if len(plans) > 1 else "")
    with contextlib.ExitStack() as files, \
            tqdm(total=sum(len(plan.pending) for plan in plans), desc=f"{entry.name} {label}",
                 mininterval=progress_interval()) as progress:
        outs = [files.enter_context(open(plan.answers_file, "a", encoding="utf-8")) for plan in plans]
        for indices, prepared in zip(batches, loader):
            wanted = [[k for k, i in enumerate(indices) if union[i].key in keys] for keys in pending_keys]
            images = {key: family.batch_images([p[key] for _, p, _ in prepared if p is not None], device, dtype)
                      for key in variants}
            with contextlib.ExitStack() as batch_scope:
                for key, batch_images in images.items():
                    sharing = sum(1 for plan, rows, k in zip(plans, wanted, keys)
                                  if rows and k == key and shares_encoding(plan.args.reduction))
                    if sharing > 1 and torch.is_tensor(batch_images):
                        # one memo per batch: configurations of another key bring other pixels, which it misses
                        memo = batch_scope.enter_context(family.shared_encoding(model))
                        with torch.inference_mode():
                            memo.encode(batch_images)
                        break
                for p, (plan, rows) in enumerate(zip(plans, wanted)):
                    if not rows:
                        continue
                    if p != applied:
                        apply_reduction(model, plan.args, plan.settings["base"])
                        applied = p
                    began = time.perf_counter()
                    texts = _generate(model, tokenizer, [prepared[k] for k in rows],
                                      _rows_of(images[keys[p]], rows, len(indices)), device, args, sampling, eos,
                                      family)
                    counts[p][1] += time.perf_counter() - began
                    counts[p][0] += sum(n for _, n in texts)
                    answers = {indices[k]: text for k, (text, _) in zip(rows, texts)}
                    # one write per batch, in question order (the finished file is put in question order anyway)
                    outs[p].write("".join(dumps_line(entry, entry.answer_line(union[i], answers[i], model_name))
                                          for i in sorted(answers)))
                    outs[p].flush()
                    progress.update(len(rows))
    return [(int(n), float(t)) for n, t in counts]


def _batch_images(pixels: Sequence[Any], device, dtype) -> Any:
    """One batch's pixels on the model's device: a tensor when every image has one shape, else a list
    (LLaVA takes both); None for a batch without images."""
    import torch

    if not pixels:
        return None
    if len({p.shape for p in pixels}) == 1:
        return torch.stack(list(pixels)).to(device=device, dtype=dtype)
    return [p.to(device=device, dtype=dtype) for p in pixels]


def _rows_of(images: Any, rows: Sequence[int], batch: int) -> Any:
    """The images of some rows of a batch (the very batch object when all rows are wanted)."""
    if images is None or len(rows) == batch:
        return images
    if isinstance(images, list):
        return [images[k] for k in rows]
    return images[list(rows)]


def _generate(model, tokenizer, prepared: Sequence[Tuple[Any, Any, Any]], images: Any, device, args: argparse.Namespace,
              sampling: Mapping[str, Any], eos: Tuple[int, ...], family=None) -> List[Tuple[str, int]]:
    """(answer text, generated tokens) of each prepared item, generated together by the model's family
    (``family.generate``)."""
    import torch

    from .arguments import default_family

    family = family or default_family()
    with torch.inference_mode():
        output_ids = family.generate(
            model, tokenizer, [ids for ids, _, _ in prepared], images,
            [size for _, _, size in prepared] if images is not None else None,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            use_cache=True,
            **sampling,
        )
    # Generating from embeddings, transformers starts every row with the start token it made the input
    # of; it is no generated token.
    start = getattr(model.generation_config, "bos_token_id", None)
    answers = []
    for row in output_ids:
        row = until_eos(row, eos)
        generated = int(row.shape[-1]) - int(start is not None and row.numel() > 0 and int(row[0]) == start)
        answers.append((tokenizer.decode(row, skip_special_tokens=True).strip(), generated))
    return answers


def llava_generate(model, tokenizer, prompts: Sequence[Any], images: Any, image_sizes: Any, **generate_kwargs) -> Any:
    """LLaVA's generate of a batch (``LlavaFamily.generate``): prompts padded on the left, the images and
    their sizes as llava's ``generate(images=, image_sizes=)`` takes them."""
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_left(list(prompts), tokenizer.pad_token_id or 0)
    with _padded_on_the_left(model, len(prompts) > 1):
        return model.generate(
            input_ids.to(device),
            # without padding the call of batch 1, unchanged; a padded batch needs its mask
            **({} if attention_mask is None else {"attention_mask": attention_mask.to(device)}),
            images=images,
            image_sizes=image_sizes,
            **generate_kwargs,
        )


def plan_batches(items: Sequence[Item], batch_size: int, prompt_length: Callable[[int], int]) -> List[List[int]]:
    """Indices of ``items`` grouped into batches of at most ``batch_size``, in the order they are generated.

    Batch size 1 keeps question order (the official runs' order, which sampling's random stream depends
    on). Larger batches hold items of similar prompt length, so that little of a batch is padding, and
    never mix items with and without an image (LLaVA would then feed an image to the text-only prompt);
    the longest batches go first, so that a batch too big for the memory fails at once, not hours in."""
    if batch_size == 1:
        return [[i] for i in range(len(items))]
    order = sorted(range(len(items)), key=lambda i: (items[i].image is None, -prompt_length(i), i))
    batches: List[List[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and \
                (items[batches[-1][0]].image is None) == (items[i].image is None):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pad_left(rows: Sequence[Any], pad_id: int) -> Tuple[Any, Optional[Any]]:
    """(input_ids [B, L] padded on the left, attention mask or None when no row needed padding).

    Generation continues from the last position of every row, so the padding goes before the prompt."""
    import torch

    longest = max(int(r.shape[-1]) for r in rows)
    if all(int(r.shape[-1]) == longest for r in rows):
        return torch.stack(list(rows)), None
    ids = torch.full((len(rows), longest), pad_id, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, longest - r.shape[-1]:] = r
        mask[b, longest - r.shape[-1]:] = 1
    return ids, mask


@contextlib.contextmanager
def _padded_on_the_left(model, batched: bool) -> Iterator[None]:
    """While a batch is generated, stock LLaVA pads the assembled embeddings on the left.

    Stock LLaVA-1.5 pads them on ``config.tokenizer_padding_side`` ("right", its training side), which
    would put padding between a short prompt and its answer; a model with restore.apply already pads on
    the left inside generate. One row has no padding: batch 1 runs untouched."""
    if not batched:
        yield
        return
    config = model.config
    missing = object()
    old = getattr(config, "tokenizer_padding_side", missing)
    config.tokenizer_padding_side = "left"
    try:
        yield
    finally:
        if old is missing:
            del config.tokenizer_padding_side
        else:
            config.tokenizer_padding_side = old


def _eos_ids(model) -> Tuple[int, ...]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def until_eos(row: Any, eos: Tuple[int, ...]) -> Any:
    """``row`` up to its first end-of-sequence token, included: what the row would be generated alone.
    In a batch, a row that ended early is filled with padding while the others go on."""
    import torch

    if not eos or row.numel() == 0:
        return row
    ends = torch.isin(row, torch.tensor(eos, device=row.device)).nonzero()
    return row if ends.numel() == 0 else row[: int(ends[0]) + 1]


def _identity(x):
    return x


class PreparedItems:
    """Map-style dataset: prompt ids, preprocessed image and original size of each pending item, as the
    model's family prompts and preprocesses them. With ``variants`` (preprocessing key -> the settings of
    a configuration that uses it), one pixel tensor per key: configurations whose reduced layout needs
    other pixels (a family's choice) get their own."""

    def __init__(self, items: Sequence[Item], tokenizer, image_processor, model_config, conv_mode: str, family=None,
                 variants: Optional[Mapping[Any, Any]] = None):
        from .arguments import default_family

        self.items, self.tokenizer, self.image_processor = items, tokenizer, image_processor
        self.model_config, self.conv_mode = model_config, conv_mode
        self.family = family or default_family()
        self.variants = dict(variants) if variants is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def prompt_ids(self, index: int):
        item = self.items[index]
        return self.family.prompt_ids(self.tokenizer, item.text, item.image is not None, self.conv_mode,
                                      self.model_config)

    def prompt_length(self, index: int) -> int:
        """Tokens of the prompt (the image placeholder counts one: every image adds the same number)."""
        return int(self.prompt_ids(index).shape[-1])

    def __getitem__(self, index: int):
        item = self.items[index]
        input_ids = self.prompt_ids(index)
        if item.image is None:
            return input_ids, None, None
        image = item.image.open()
        if self.variants is None:
            return input_ids, self.family.preprocess_image(image, self.image_processor, self.model_config), image.size
        pixels = {key: self.family.preprocess_image(image, self.image_processor, self.model_config, settings)
                  for key, settings in self.variants.items()}
        return input_ids, pixels, image.size


def _preprocessing_of_every_configuration(plans: Sequence[Plan]) -> Callable[[Any], Any]:
    """``image -> pixels`` of each distinct preprocessing the configurations use (a family may preprocess
    a reduced layout differently), so that an image none of them could take fails before loading."""
    from types import SimpleNamespace

    from restore.families import CheckpointError, read_checkpoint_config

    args = plans[0].args
    try:
        config = SimpleNamespace(**read_checkpoint_config(os.path.expanduser(args.model_path))[1])
    except (FileNotFoundError, CheckpointError):
        config = None  # a --model-base checkpoint: checked as the unreduced model preprocesses
    variants = {None: None} if config is None else \
        {args.family.preprocessing_key(config, plan.args.reduction): plan.args.reduction for plan in plans}
    protocol = getattr(args, "image_protocol", None)
    extra = {"image_protocol": protocol} if protocol else {}
    checks = [image_preprocessing_for_check(args.model_path, settings, **extra) for settings in variants.values()]
    return checks[0] if len(checks) == 1 else (lambda image: [check(image) for check in checks])


def image_preprocessing_for_check(model_path: str, settings: Any = None,
                                  image_protocol: Optional[Mapping[str, int]] = None) -> Callable[[Any], Any]:
    """``image -> pixels`` exactly as inference will preprocess it (with the evaluation's image protocol, for
    a family that has one), built by the checkpoint's family from its config and preprocessor files alone:
    no weights are read, so every image can be checked before the model loads."""
    from restore.families import CheckpointError, family_of_checkpoint

    try:
        family = family_of_checkpoint(os.path.expanduser(model_path))
        return family.preprocessing_for_check(model_path, settings,
                                              **({"image_protocol": image_protocol} if image_protocol else {}))
    except (FileNotFoundError, CheckpointError) as e:
        raise SetupError(f"--model-path: {e}") from None


def _overrides(args: argparse.Namespace) -> dict:
    """The reduction settings given on the command line."""
    from restore.settings import overrides_from

    return {k: v for k, v in overrides_from(args).items() if v is not None}


def load_model_for_eval(args: argparse.Namespace, base: Optional[str]):
    """(tokenizer, model with the reduction applied, image processor, model_name), loaded by the checkpoint's
    family (``args.family``, set when the arguments were checked)."""
    model_path = os.path.expanduser(args.model_path)
    print(f"loading model {model_path} (device {args.device}, dtype {args.dtype})", flush=True)
    protocol = getattr(args, "image_protocol", None)
    loaded = args.family.load(model_path, model_base=args.model_base, device=args.device, dtype=args.dtype,
                              **({"image_protocol": protocol} if protocol else {}))
    model = apply_reduction(loaded.model, args, base)
    reduction = describe_reduction(base, args.n_vis, args.restore, _overrides(args), args.keep)
    print(f"model loaded; reduction: {reduction}", flush=True)
    return loaded.tokenizer, model, loaded.image_processor, loaded.model_name


def apply_reduction(model, args: argparse.Namespace, base: Optional[str]):
    """``model`` with the reduction the entry point's flags ask for (``base`` already canonical; None: none)."""
    import restore

    if base is None:
        return restore.apply(model, base=None)
    return restore.apply(model, base=base, n_vis=args.n_vis, restore=args.restore, keep=args.keep,
                         **_overrides(args))


