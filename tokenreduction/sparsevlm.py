"""SparseVLM (ICML 2025): text-guided visual token sparsification inside the LLM, with token recycling.

The official LLaVA-1.5 algorithm (Gumpest/SparseVLMs, its v1.5 release; ``USE_VERSION`` unset on the main
branch), restated on the reduction mechanism's inputs:

* Raters: before the first decoder layer, each text token after the image is rated by the softmax (over
  the text tokens) of its dot products with the visual embeddings, averaged over the visual tokens; the
  tokens above the mean rating are the raters, fixed for the whole forward.
* Cuts after decoder layers 2, 6 and 15. At each, the visual tokens are scored by that layer's attention on
  its own input (mean over all heads), averaged over the rater rows; the top ``min(c_s, n - 1)`` are kept
  (``c_s`` the budget's list entry, ``n`` the image's current visual tokens).
* Recycling: of the deleted tokens, the ``int(0.3 * d) + 1`` best scored are clustered (density-peak
  clustering on the cut layer's output, ``int(m / 10) + 1`` clusters) and each cluster becomes one token
  (the mean of its members), placed after the kept tokens; the rest is dropped. Later cuts treat the
  recycled tokens as visual tokens like any other.
* Positions are re-indexed contiguously after every cut (the official v1.5 code truncates the position ids).

docs/inllm_methods.md ("SparseVLM") says where each piece comes from and how n_vis maps to the lists.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .inllm import InLLMMethod, Stage, StageChoice, StageView, fit_layers, register_llm_method

# Decoder layers after which the official code cuts (its layer_dict): their outputs are cut, so the first
# layer that sees the reduced tokens is the next one.
OFFICIAL_PRUNE_LAYERS: Tuple[int, ...] = (2, 6, 15)
# Visual tokens kept by score at each cut, per advertised budget (the v1.5 release's lists; on the main
# branch these are the lists used when SparseVLM+ mode is off). The recycled tokens come on top.
SPARSE_TOKEN_LISTS: Dict[int, Tuple[int, int, int]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
RECYCLE_SHARE = 0.3  # share of the deleted tokens that are recycled (the best scored ones)
TOKENS_PER_CLUSTER = 10  # recycled tokens per cluster, roughly
DENSITY_NOISE = 1e-6  # the official tie-breaking noise added to the densities
DENSITY_NOISE_SEED = 0  # our noise is drawn from a private generator so a sample's choice never depends on the batch


def supported_budget(n_vis: int) -> Tuple[int, int, int]:
    """The official kept-token list for ``n_vis``; ValueError for a budget the authors give no list for."""
    if n_vis not in SPARSE_TOKEN_LISTS:
        supported = ", ".join(str(b) for b in sorted(SPARSE_TOKEN_LISTS, reverse=True))
        raise ValueError(f"SparseVLM has official settings only for n_vis in {{{supported}}}, got {n_vis}")
    return SPARSE_TOKEN_LISTS[n_vis]


def kept_by_score(listed: int, n_current: int) -> int:
    """Tokens the cut keeps by score: the list entry, but always deleting at least one token."""
    return min(listed, n_current - 1)


def recycled_count(n_deleted: int) -> int:
    """How many deleted tokens are recycled (0 when nothing is deleted)."""
    return int(n_deleted * RECYCLE_SHARE) + 1 if n_deleted > 0 else 0


def cluster_count(n_recycled: int) -> int:
    """How many merged tokens the recycled tokens become."""
    return int(n_recycled / TOKENS_PER_CLUSTER) + 1 if n_recycled > 0 else 0


def tokens_after_cut(listed: int, n_current: int) -> Tuple[int, int]:
    """(kept by score, merged) visual tokens after one cut of an image with ``n_current`` tokens."""
    kept = kept_by_score(listed, n_current)
    return kept, cluster_count(recycled_count(n_current - kept))


def visual_counts(n_vis: int, num_patches: int) -> List[int]:
    """Visual tokens per image after each cut (kept + merged), starting from ``num_patches``."""
    counts, n = [], num_patches
    for listed in supported_budget(n_vis):
        kept, merged = tokens_after_cut(listed, n)
        n = kept + merged
        counts.append(n)
    return counts


def fitted_cut_layers(num_layers: int) -> List[int]:
    """First reduced layer of each cut: the official ones, scaled down (strictly increasing) on a shallow LLM."""
    return fit_layers([p + 1 for p in OFFICIAL_PRUNE_LAYERS], num_layers)


def select_raters(input_hidden: torch.Tensor, input_visual_index: torch.Tensor) -> torch.Tensor:
    """[T] bool over the text tokens after the image: the raters, from the embeddings entering layer 0.

    Each text token's relevance is the softmax over text tokens of its dot product with a visual token,
    averaged over the visual tokens; raters are the tokens above the mean relevance. Computed in the
    embeddings' dtype, as the official code does.
    """
    visual = input_hidden[input_visual_index]
    text = input_hidden[int(input_visual_index[-1]) + 1:]
    relevance = (visual @ text.T).softmax(dim=1).mean(dim=0)
    return relevance > relevance.mean()


def rater_scores(attention_rows: torch.Tensor, raters: torch.Tensor, visual_index: torch.Tensor) -> torch.Tensor:
    """[n] mean attention of the rater rows to the image's current visual tokens."""
    return attention_rows[raters][:, visual_index].mean(dim=0)


def density_peak_clusters(features: torch.Tensor, n_clusters: int,
                          noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[m] cluster (0..n_clusters-1) of each row of ``features`` [m, D] by density-peak clustering.

    Density: exp of minus the mean squared (dimension-normalised) distance to the ``n_clusters`` nearest
    tokens (self included), plus a tiny noise so no two densities tie. A token's separation is its distance
    to the nearest denser token (the largest distance for the densest one). Centres: the ``n_clusters``
    largest density * separation, cluster c being the c-th largest; every token joins its nearest centre
    (the first on ties) and each centre its own cluster.
    """
    m, dim = features.shape
    distance = (features[:, None, :] - features[None, :, :]).norm(dim=-1, p=2) / (dim ** 0.5)
    nearest = distance.topk(k=n_clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    if noise is None:
        noise = density_noise(m)
    density = density + noise.to(device=density.device, dtype=density.dtype) * DENSITY_NOISE
    denser = (density[None, :] > density[:, None]).to(features.dtype)
    largest = distance.max()
    separation = (distance * denser + largest * (1 - denser)).min(dim=-1).values
    centres = (separation * density).topk(k=n_clusters).indices
    cluster = distance[centres].argmin(dim=0)
    cluster[centres] = torch.arange(n_clusters, device=features.device)
    return cluster


def density_noise(m: int) -> torch.Tensor:
    """[m] float32 uniform noise from a fixed-seed CPU generator (the draws ``torch.rand`` makes after
    ``torch.manual_seed(DENSITY_NOISE_SEED)``), so the tie-breaking is the same alone and in a batch."""
    generator = torch.Generator().manual_seed(DENSITY_NOISE_SEED)
    return torch.rand(m, generator=generator)


def cluster_means(features: torch.Tensor, cluster: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """[n_clusters, D] each cluster's mean as the official code forms it: every member weighted by one
    over (cluster size + 1e-6), summed; so a merged token is the mean scaled by size / (size + 1e-6)."""
    counts = features.new_zeros(n_clusters, 1).index_add_(0, cluster, features.new_ones(len(cluster), 1)) + 1e-6
    weighted = features * (features.new_ones(len(cluster), 1) / counts[cluster])
    return features.new_zeros(n_clusters, features.shape[1]).index_add_(0, cluster, weighted)


class SparseVLM(InLLMMethod):
    name = "SparseVLM"
    query_rows = "text_after_image"
    plain_positions = "reindexed"
    plain_merged_placement = "after_kept"  # recycled tokens follow the kept ones, in cluster order
    needs_input_hidden = True  # raters come from the embeddings entering layer 0

    def stages(self, n_vis: int, num_patches: int, num_layers: int) -> List[Stage]:
        layers = fitted_cut_layers(num_layers)
        return [Stage(layer=layer, budget=count, score_layer=layer - 1)
                for layer, count in zip(layers, visual_counts(n_vis, num_patches))]

    def raters(self, view: StageView) -> torch.Tensor:
        if view.input_hidden is None or view.input_visual_index is None:
            raise ValueError("SparseVLM needs the stage view's input_hidden and input_visual_index "
                             "(the embeddings entering layer 0) to choose its text raters")
        raters = select_raters(view.input_hidden, view.input_visual_index)
        if raters.shape[0] != view.attention.shape[0]:
            raise ValueError(f"SparseVLM: {raters.shape[0]} text tokens after the image in the embeddings but "
                             f"{view.attention.shape[0]} attention rows at stage {view.stage}")
        return raters.to(view.attention.device)

    def scores(self, view: StageView) -> torch.Tensor:
        return rater_scores(view.attention, self.raters(view), view.visual_index)

    def plain_choice(self, view: StageView) -> StageChoice:
        if view.n_vis is None:
            raise ValueError("SparseVLM's cut needs the stage view's n_vis (the requested budget)")
        n_current = len(view.visual_index)
        kept, merged = tokens_after_cut(supported_budget(view.n_vis)[view.stage], n_current)
        return recycle_choice(self.scores(view), view.hidden[view.visual_index], kept, merged)


def recycle_choice(scores: torch.Tensor, visual_hidden: torch.Tensor, kept: int, n_clusters: int,
                   noise: Optional[torch.Tensor] = None) -> StageChoice:
    """One official cut: keep the ``kept`` best scored, recycle the best ``int(0.3 d) + 1`` of the ``d``
    deleted into ``n_clusters`` merged tokens (features from ``visual_hidden`` [n, D]), drop the rest."""
    n = scores.shape[0]
    keep_mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    keep_mask[scores.topk(kept).indices] = True
    keep = keep_mask.nonzero().squeeze(1)  # ascending: kept tokens stay in sequence order
    deleted = (~keep_mask).nonzero().squeeze(1)
    n_recycled = recycled_count(len(deleted))
    if n_recycled == 0:
        return StageChoice(keep=keep)
    # the recycled members in the official order (best score first): the clustering's ties depend on it
    members = deleted[scores[deleted].topk(n_recycled).indices]
    features = visual_hidden[members]
    cluster = density_peak_clusters(features, n_clusters, noise)
    return StageChoice(keep=keep, merged_members=members, group_of=cluster, n_groups=n_clusters,
                       merged_features=cluster_means(features, cluster, n_clusters))


register_llm_method(SparseVLM())
