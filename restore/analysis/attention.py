"""How much attention visual tokens receive, layer by layer (the analysis of the paper's Figure 2).

For one prompt, a prefill with ``output_attentions=True`` returns each decoder layer's attention
probabilities. transformers 4.37 computes them with eager attention (SDPA cannot return them) and
with the mask the patched model installs, so under RESTORE they include its calibration bias.
Per layer: average over heads; for every query row sum the probabilities on visual keys (its
visual share, in [0, 1]); average the rows of a query group: the visual tokens themselves, and
the text after the image (the question and the assistant prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from llava.constants import IMAGE_TOKEN_INDEX

import restore

QUERY_GROUPS = ("visual", "text")


@dataclass
class AttentionShares:
    """Per-layer mean visual share of each query group, for one configuration."""

    label: str
    n_visual: int  # visual tokens in the sequence
    seq_len: int
    shares: Dict[str, List[float]]  # query group -> one value per decoder layer


def row_shares(probs: torch.Tensor, visual_keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(visual share, non-visual share) of every query row of ``probs`` [..., Lq, Lk]; they sum to the row sum."""
    probs = probs.float()
    visual = (probs * visual_keys.to(probs.dtype)).sum(dim=-1)
    return visual, probs.sum(dim=-1) - visual


def sequence_visual_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[L] bool: which positions of the assembled prefill (one sample) hold visual tokens.

    A patched model records it in its layout; stock LLaVA puts all N patches where the single
    ``<image>`` placeholder was.
    """
    if restore.is_applied(model):
        layout = model._restore_ctx.layout
        if layout is None:
            raise RuntimeError("the patched model has no layout: run a prefill with images first")
        return layout.is_visual[0]
    ids = input_ids[0]
    slots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
    if len(slots) != 1:
        raise ValueError(f"the prompt must hold exactly one <image> placeholder, found {len(slots)}")
    num_patches = int(model.get_vision_tower().num_patches)
    mask = torch.zeros(ids.shape[0] - 1 + num_patches, dtype=torch.bool, device=ids.device)
    mask[int(slots[0]): int(slots[0]) + num_patches] = True
    return mask


def query_groups(is_visual: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Row masks: the visual tokens, and the text after the last visual token."""
    after = torch.zeros_like(is_visual)
    last_visual = int(is_visual.nonzero().max())
    after[last_visual + 1:] = True
    return {"visual": is_visual, "text": after}


@torch.inference_mode()
def prefill_attentions(model, input_ids, images, image_sizes) -> Tuple[Tuple[torch.Tensor, ...], List[torch.Tensor]]:
    """Each layer's attention probabilities [1, H, L_i, L_i] for one prompt, and its visual mask [L_i]."""
    if input_ids.shape[0] != 1:
        raise ValueError("attention analysis takes one prompt at a time (batch size 1)")
    out = model(input_ids=input_ids, images=images, image_sizes=image_sizes, output_attentions=True, use_cache=False)
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the model returned no attention probabilities (flash attention cannot); "
                           "load it with attn_implementation='eager' or 'sdpa'")
    return out.attentions, layer_visual_masks(model, input_ids, len(out.attentions))


def layer_visual_masks(model, input_ids: torch.Tensor, num_layers: int) -> List[torch.Tensor]:
    """[L_i] bool per decoder layer: which of the tokens that layer sees are visual (a method cutting inside
    the LLM shortens the sequence of the layers after each cut)."""
    run = getattr(getattr(model, "_restore_ctx", None), "run", None) if restore.is_applied(model) else None
    if run is None:
        return [sequence_visual_mask(model, input_ids)] * num_layers
    return [run.layouts[run.layout_index(i)].is_visual[0] for i in range(num_layers)]


def layer_shares(attentions, is_visual) -> Dict[str, List[float]]:
    """Mean visual share per query group and layer, heads averaged first. ``is_visual``: one [L] mask for
    every layer, or a list of one mask per layer."""
    masks = is_visual if isinstance(is_visual, (list, tuple)) else [is_visual] * len(attentions)
    result: Dict[str, List[float]] = {name: [] for name in QUERY_GROUPS}
    for probs, mask in zip(attentions, masks):
        groups = query_groups(mask)
        visual, _ = row_shares(probs[0].float().mean(dim=0), mask)
        for name in QUERY_GROUPS:
            result[name].append(float(visual[groups[name]].mean()))
    return result


def figure_configs(base: str, figure: int) -> List[Tuple[str, Optional[dict]]]:
    """The curves of the paper's Figure 2 (full, re-indexed, retained, retained + calibrated) or Figure 5
    (Figure 2 plus re-indexed + calibrated), as (label, restore.apply settings; None = stock)."""
    configs = [("full", None), (f"{base} re-indexed", dict(restore=False)),
               (f"{base} retained", dict(restore=False, positions="retained")),
               (f"{base} retained + calibrated", dict(restore=False, positions="retained", calibration="size_distance"))]
    if figure == 5:
        configs.append((f"{base} re-indexed + calibrated", dict(restore=False, calibration="size_distance")))
    elif figure != 2:
        raise ValueError(f"figure must be 2 or 5, got {figure}")
    return configs


def analyse_configs(model, input_ids, images, image_sizes, base: str, n_vis: int,
                    configs: Optional[Sequence[Tuple[str, Optional[dict]]]] = None) -> List[AttentionShares]:
    """Visual attention shares for each configuration, the model left stock afterwards.

    ``configs``: (label, settings of :func:`restore.apply` without base and n_vis, or None for the stock
    model); by default full, ``base`` alone and ``base`` + RESTORE.
    """
    if configs is None:
        configs = [("full", None), (base, dict(restore=False)), (f"{base}+RESTORE", dict(restore=True))]
    results = []
    try:
        for label, settings in configs:
            if settings is None:
                restore.remove(model)
            else:
                restore.apply(model, base=base, n_vis=n_vis, **settings)
            attentions, masks = prefill_attentions(model, input_ids, images, image_sizes)
            # visual tokens and length as the last layer sees them (the same in every layer unless cut in the LLM)
            results.append(AttentionShares(label, int(masks[-1].sum()), int(masks[-1].shape[0]),
                                           layer_shares(attentions, masks)))
    finally:
        restore.remove(model)
    return results


def format_table(results: List[AttentionShares]) -> str:
    header = ["layer"] + [f"{r.label} {group}-q" for group in QUERY_GROUPS for r in results]
    n_layers = len(results[0].shares["visual"])
    rows = [header]
    for layer in range(n_layers):
        rows.append([str(layer)] + [f"{r.shares[group][layer]:.3f}" for group in QUERY_GROUPS for r in results])
    rows.append(["mean"] + [f"{sum(r.shares[group]) / n_layers:.3f}" for group in QUERY_GROUPS for r in results])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot(results: List[AttentionShares], path, title: Optional[str] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    styles = {0: ("black", ":", "o"), 1: ("tab:orange", "--", "s"), 2: ("tab:blue", "-", "^"),
              3: ("tab:green", "-", "D"), 4: ("tab:red", "-.", "v")}
    for ax, group, name in zip(axes, QUERY_GROUPS, ("visual queries", "text queries (after the image)")):
        for index, r in enumerate(results):
            color, line, marker = styles.get(index, (None, "-", "o"))
            values = r.shares[group]
            ax.plot(range(len(values)), values, color=color, linestyle=line, marker=marker,
                    label=f"{r.label} ({r.n_visual} visual tokens)")
        ax.set_title(name)
        ax.set_xlabel("decoder layer")
        n_layers = len(results[0].shares[group])
        ax.set_xticks(range(0, n_layers, 1 if n_layers <= 16 else 4))
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("attention mass on visual tokens")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
