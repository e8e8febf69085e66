"""SparseVLM: the method's StageView -> StageChoice against a loop-by-loop restatement of the official
LLaVA-1.5 algorithm (Gumpest/SparseVLMs v1.5), over all three cuts of a stand-in decoder, several budgets.

The restatement runs the official forward's logic on a whole sequence (system prompt, image, text) the
way the official code does (one sequence, index ranges, the rater rows of each layer's mean-head attention,
the deleted tokens' recycling by density-peak clustering written with Python loops, the merged tokens
placed after the kept ones). It shares no code with tokenreduction.sparsevlm. Set SPARSEVLM_OFFICIAL_DIR
to a checkout of github.com/Gumpest/SparseVLMs to also run the official score.py / utils.py functions on
the same inputs; that test is skipped otherwise.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from pathlib import Path
from typing import List, NamedTuple, Tuple

import pytest
import torch

from tokenreduction.inllm import StageChoice, StageView, check_stages, llm_method

# The official lists (score.py, USE_VERSION unset) and cut layers (layer_dict), restated.
OFFICIAL_LISTS = {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]}
OFFICIAL_CUTS = [2, 6, 15]
N_PATCHES = 576
N_SYSTEM = 35
DIM = 48
HEADS = 4


# --------------------------------------------------------------------------------------------------
# A stand-in decoder: per layer, random per-head attention from the layer's own queries and keys
# (causal softmax), and an output that depends on the input (so merged features feed later cuts)
# --------------------------------------------------------------------------------------------------

class StandInLayer(NamedTuple):
    wq: torch.Tensor  # [H, D, d]
    wk: torch.Tensor
    w_out: torch.Tensor  # [D, D]

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """[H, L, L] causal softmax attention of x [L, D] (RMS-normalised first, as a Llama layer does:
        it keeps the attention away from exact zeros, whose ties no two top-k implementations break alike)."""
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        q = torch.einsum("ld,hde->hle", x, self.wq)
        k = torch.einsum("ld,hde->hle", x, self.wk)
        logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        causal = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).tril()
        return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(x @ self.w_out)


def stand_in_layers(seed: int, num_layers: int = 17) -> List[StandInLayer]:
    g = torch.Generator().manual_seed(seed)
    return [StandInLayer(torch.randn(HEADS, DIM, 16, generator=g) * 0.4, torch.randn(HEADS, DIM, 16, generator=g) * 0.4,
                         torch.randn(DIM, DIM, generator=g) * 0.2) for _ in range(num_layers)]


def random_embeddings(seed: int, n_text: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(N_SYSTEM + N_PATCHES + n_text, DIM, generator=g)


# --------------------------------------------------------------------------------------------------
# Loop-by-loop restatement of the official algorithm
# --------------------------------------------------------------------------------------------------

def official_raters(embeddings: torch.Tensor, v_start: int, n_vis: int) -> List[int]:
    """Text offsets (after the image) whose mean-over-visual softmax relevance is above the mean."""
    text = embeddings[v_start + n_vis:]
    relevance = [0.0] * text.shape[0]
    for i in range(n_vis):
        row = (embeddings[v_start + i] @ text.T).softmax(dim=0)
        for j in range(text.shape[0]):
            relevance[j] += float(row[j])
    relevance = torch.tensor(relevance, dtype=embeddings.dtype) / n_vis
    # (the official averages in the embeddings' dtype; the float32 rounding of the sum order can only
    # matter for a relevance within rounding of the mean, which random inputs do not produce)
    return [j for j in range(text.shape[0]) if relevance[j] > relevance.mean()]


def official_clusters(features: torch.Tensor, n_clusters: int, noise: torch.Tensor) -> List[int]:
    """Density-peak clustering, one token at a time."""
    m, dim = features.shape
    dist = [[float((features[i] - features[j]).norm()) / dim ** 0.5 for j in range(m)] for i in range(m)]
    density = []
    for i in range(m):
        nearest = sorted(dist[i])[:n_clusters]
        density.append(math.exp(-sum(d * d for d in nearest) / n_clusters) + float(noise[i]) * 1e-6)
    largest = max(max(row) for row in dist)
    score = []
    for i in range(m):
        denser = [dist[i][j] for j in range(m) if density[j] > density[i]]
        score.append((min(denser) if denser else largest) * density[i])
    centres = sorted(range(m), key=lambda i: -score[i])[:n_clusters]
    cluster = []
    for i in range(m):
        if i in centres:
            cluster.append(centres.index(i))
        else:
            to_centres = [dist[i][c] for c in centres]
            cluster.append(to_centres.index(min(to_centres)))
    return cluster


class OfficialCut(NamedTuple):
    kept: List[int]  # indices into the image's current tokens, ascending
    recycled: List[int]  # indices into the image's current tokens, best score first
    cluster: List[int]  # cluster of each recycled token
    merged: torch.Tensor  # [g, D]


def official_forward(embeddings: torch.Tensor, layers: List[StandInLayer], n_vis: int, seed_noise: bool = True
                     ) -> Tuple[List[OfficialCut], List[int]]:
    """The official prefill's cuts on one sequence; also the visual token count after each cut."""
    v_start, v_num = N_SYSTEM, N_PATCHES
    raters = official_raters(embeddings, v_start, v_num)
    x = embeddings
    cuts, counts = [], []
    for layer_idx in range(max(OFFICIAL_CUTS) + 1):
        layer = layers[layer_idx]
        if layer_idx in OFFICIAL_CUTS:
            attn = layer.attention(x).mean(dim=0)
            out = layer.output(x)
            t_start = v_start + v_num
            relation = torch.stack([attn[[t_start + r for r in raters], v_start + i].mean() for i in range(v_num)])
            k = min(OFFICIAL_LISTS[n_vis][OFFICIAL_CUTS.index(layer_idx)], v_num - 1)
            order = sorted(range(v_num), key=lambda i: -float(relation[i]))
            kept = sorted(order[:k])
            deleted = [i for i in range(v_num) if i not in kept]
            n_rec = int(len(deleted) * 0.3) + 1
            recycled = sorted(deleted, key=lambda i: -float(relation[i]))[:n_rec]
            g = int(n_rec / 10) + 1
            feats = out[[v_start + i for i in recycled]]
            if seed_noise:
                torch.manual_seed(0)
            cluster = official_clusters(feats, g, torch.rand(1, n_rec)[0])
            merged = torch.zeros(g, x.shape[1], dtype=x.dtype)
            for c in range(g):
                members = [feats[i] for i in range(n_rec) if cluster[i] == c]
                weight = torch.ones(1, dtype=x.dtype) / (torch.tensor(float(len(members)), dtype=x.dtype) + 1e-6)
                for f in members:
                    merged[c] += f * weight
            cuts.append(OfficialCut(kept, recycled, cluster, merged))
            x = torch.cat([out[:v_start], out[[v_start + i for i in kept]], merged, out[v_start + v_num:]])
            v_num = k + g
            counts.append(v_num)
        else:
            x = layer.output(x)
    return cuts, counts


# --------------------------------------------------------------------------------------------------
# The method driven through StageViews, the test playing the mechanism's plain row
# --------------------------------------------------------------------------------------------------

def method_forward(embeddings: torch.Tensor, layers: List[StandInLayer], n_vis: int
                   ) -> Tuple[List[StageChoice], List[int]]:
    method = llm_method("SparseVLM")
    stages = method.stages(n_vis, N_PATCHES, 32)
    check_stages("SparseVLM", stages, N_PATCHES, 32)
    input_visual_index = torch.arange(N_SYSTEM, N_SYSTEM + N_PATCHES)
    x = embeddings
    n_current = N_PATCHES
    choices, counts = [], []
    by_layer = {s.score_layer: (i, s) for i, s in enumerate(stages)}
    for layer_idx in range(max(s.layer for s in stages)):
        layer = layers[layer_idx]
        if layer_idx not in by_layer:
            x = layer.output(x)
            continue
        i, stage = by_layer[layer_idx]
        assert stage.layer == layer_idx + 1
        visual_index = torch.arange(N_SYSTEM, N_SYSTEM + n_current)
        query_index = torch.arange(N_SYSTEM + n_current, x.shape[0])
        attention = layer.attention(x).mean(dim=0)[query_index].float()
        out = layer.output(x)
        view = StageView(attention=attention, query_index=query_index, visual_index=visual_index, hidden=out,
                         sizes=torch.ones(n_current), stage=i, budget=stage.budget, input_hidden=embeddings,
                         input_visual_index=input_visual_index, n_vis=n_vis)
        choice = method.plain_choice(view)
        choices.append(choice)
        merged = choice.merged_features
        x = torch.cat([out[:N_SYSTEM], out[visual_index[choice.keep]], merged, out[N_SYSTEM + n_current:]])
        n_current = len(choice.keep) + choice.n_groups
        assert n_current == stage.budget
        counts.append(n_current)
    return choices, counts


CASES = [(seed, n_vis, n_text) for seed, (n_vis, n_text) in enumerate(
    [(192, 20), (128, 37), (96, 60), (64, 45), (64, 20), (128, 60), (192, 52)])]


@pytest.mark.parametrize("seed,n_vis,n_text", CASES)
def test_matches_official_restatement(seed: int, n_vis: int, n_text: int) -> None:
    torch.manual_seed(seed)
    embeddings, layers = random_embeddings(seed, n_text), stand_in_layers(seed)
    official, official_counts = official_forward(embeddings, layers, n_vis)
    choices, counts = method_forward(embeddings, layers, n_vis)
    assert counts == official_counts
    for cut, choice in zip(official, choices):
        assert choice.keep.tolist() == cut.kept
        assert choice.merged_members.tolist() == cut.recycled
        assert choice.group_of.tolist() == cut.cluster
        assert choice.n_groups == len(set(cut.cluster))
        torch.testing.assert_close(choice.merged_features, cut.merged, rtol=1e-6, atol=1e-6)


def expected_counts(n_vis: int, n: int = N_PATCHES) -> List[int]:
    counts = []
    for listed in OFFICIAL_LISTS[n_vis]:
        k = min(listed, n - 1)
        rec = int((n - k) * 0.3) + 1
        n = k + int(rec / 10) + 1
        counts.append(n)
    return counts


@pytest.mark.parametrize("n_vis", sorted(OFFICIAL_LISTS))
def test_stage_schedule(n_vis: int) -> None:
    stages = llm_method("SparseVLM").stages(n_vis, N_PATCHES, 32)
    assert [(s.layer, s.score_layer) for s in stages] == [(3, 2), (7, 6), (16, 15)]
    assert [s.budget for s in stages] == expected_counts(n_vis)
    assert expected_counts(192) == [309, 204, 113]  # 300 + 9, 200 + 4, 110 + 3


def test_unsupported_budget_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"192, 128, 96, 64"):
        llm_method("SparseVLM").stages(100, N_PATCHES, 32)


def test_shallow_llm_keeps_three_increasing_cuts() -> None:
    stages = llm_method("SparseVLM").stages(64, N_PATCHES, 4)
    assert [s.layer for s in stages] == [1, 2, 3]
    assert all(s.score_layer == s.layer - 1 for s in stages)


@pytest.mark.parametrize("seed,n_vis,n_text", CASES[:4])
def test_invariants(seed: int, n_vis: int, n_text: int) -> None:
    embeddings, layers = random_embeddings(seed, n_text), stand_in_layers(seed)
    choices, counts = method_forward(embeddings, layers, n_vis)
    n = N_PATCHES
    for stage, (choice, count) in enumerate(zip(choices, counts)):
        listed = OFFICIAL_LISTS[n_vis][stage]
        assert len(choice.keep) == min(listed, n - 1)
        keep, members = set(choice.keep.tolist()), choice.merged_members.tolist()
        assert not keep & set(members) and len(set(members)) == len(members)
        assert len(members) == int((n - len(keep)) * 0.3) + 1
        groups = choice.group_of.tolist()
        assert sorted(set(groups)) == list(range(choice.n_groups))  # every group non-empty: a partition
        assert choice.merged_features.shape == (choice.n_groups, DIM)
        assert count == len(keep) + choice.n_groups
        n = count


def test_tiny_image_keeps_all_but_one_and_recycles_it() -> None:
    # fewer tokens than the list entry: the official min(c, n - 1) deletes one token and recycles it alone
    method = llm_method("SparseVLM")
    assert [s.budget for s in method.stages(192, 16, 32)] == [16, 16, 16]


# --------------------------------------------------------------------------------------------------
# The official functions themselves (skipped without a checkout)
# --------------------------------------------------------------------------------------------------

OFFICIAL_DIR = os.environ.get("SPARSEVLM_OFFICIAL_DIR")


def _einops_shim() -> types.ModuleType:
    """The one einops call utils.py makes (adding a singleton axis), for environments without einops."""
    shim = types.ModuleType("einops")

    def rearrange(x: torch.Tensor, pattern: str) -> torch.Tensor:
        if pattern == "b l r -> b l () r":
            return x.unsqueeze(2)
        if pattern == "b l r -> b () l r":
            return x.unsqueeze(1)
        raise NotImplementedError(pattern)

    shim.rearrange = rearrange
    return shim


def _load_official(name: str, path: Path, package: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"{package}.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


OFFICIAL_CASES = CASES + [(100 + i, n_vis, 20 + (13 * i) % 41) for i, n_vis in enumerate([192, 128, 96, 64] * 4)]


@pytest.mark.skipif(not OFFICIAL_DIR, reason="set SPARSEVLM_OFFICIAL_DIR to a Gumpest/SparseVLMs checkout")
@pytest.mark.parametrize("seed,n_vis,n_text", OFFICIAL_CASES)
def test_matches_official_functions(seed: int, n_vis: int, n_text: int, monkeypatch) -> None:
    if importlib.util.find_spec("einops") is None:
        monkeypatch.setitem(sys.modules, "einops", _einops_shim())
    root = Path(OFFICIAL_DIR) / "llava" / "model" / "language_model"
    package = "sparsevlm_official"
    monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    sys.modules[package].__path__ = [str(root)]
    utils = _load_official("utils", root / "utils.py", package)
    score = _load_official("score", root / "score.py", package)
    monkeypatch.setattr(score, "RETAIN_TOKN", n_vis)

    embeddings, layers = random_embeddings(seed, n_text), stand_in_layers(seed)
    # the official forward's glue around its functions (batch of one, as the official code runs)
    v_start, v_num = N_SYSTEM, N_PATCHES
    t_start = v_start + v_num
    m_v_t = (embeddings[None, v_start:t_start] @ embeddings[None, t_start:].transpose(1, 2)).softmax(2).mean(1)
    t_token_idx = torch.where(m_v_t > m_v_t.mean())
    x = embeddings[None]
    official = []
    for layer_idx in range(max(OFFICIAL_CUTS) + 1):
        layer = layers[layer_idx]
        if layer_idx not in OFFICIAL_CUTS:
            x = layer.output(x[0])[None]
            continue
        attn = layer.attention(x[0])[None]
        out = layer.output(x[0])[None]
        mask, _, relation = score.attn_postprocess_topk(attn, v_start, v_num, t_start, t_token_idx, layer_idx)
        deleted = torch.where(mask[0] == 0)[0]
        n_rec = int(deleted.shape[0] * 0.3) + 1
        recycled = deleted[relation[0][deleted].topk(n_rec)[1]]
        g = int(n_rec / 10) + 1
        torch.manual_seed(0)
        merged = utils.cluster_and_merge(out[:, v_start + recycled], g)
        kept = torch.where(mask[0])[0]
        official.append((kept, recycled, merged[0]))
        x = torch.cat([out[:, :v_start], out[:, v_start + kept], merged, out[:, t_start:]], dim=1)
        v_num = int(kept.shape[0]) + g
        t_start = v_start + v_num
    choices, _ = method_forward(embeddings, layers, n_vis)
    for (kept, recycled, merged), choice in zip(official, choices):
        assert choice.keep.tolist() == kept.tolist()
        assert choice.merged_members.tolist() == recycled.tolist()
        torch.testing.assert_close(choice.merged_features, merged, rtol=0, atol=0)
