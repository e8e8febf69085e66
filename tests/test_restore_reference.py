"""RESTORE end to end against a plain restatement of what the official implementation computes.

The restatement follows the official pipeline literally for one image and batch 1: CLIP with every
layer's attention maps, the base's kept tokens, the unselected tokens merged by the rule restated in
test_merge, medians as positions, then a hand-written LLaMA forward whose attention adds
log(size_j) + log(2 - rho(p_i - p_j)) (uniform visual sizes in layer 0) in the prefill and log(size_j)
alone for a decoded token. The patched model must give the same logits.
"""
import math

import pytest
import torch
from llava.constants import IMAGE_TOKEN_INDEX

import restore
import tokenreduction as tr
from tests.test_merge import reference_anchor_merge


def _vision_like_official(model, images):
    tower = model.get_vision_tower()
    out = tower.vision_tower(images, output_hidden_states=True, output_attentions=True)
    raw = out.hidden_states[tower.select_layer][:, 1:]
    attention = out.attentions[tower.select_layer][:, :, 0, 1:].mean(dim=1).float()
    return raw, model.get_model().mm_projector(raw), attention


def _reduced_tokens(model, images, base, n_vis):
    raw, features, attention = _vision_like_official(model, images)
    keep = tr.get_selector(base)(tr.VisualTokens(features, raw, attention), n_vis // 2)[0].tolist()
    rest = [i for i in range(features.shape[1]) if i not in keep]
    anchors, groups = reference_anchor_merge(features[0, rest].double(), n_vis - len(keep))
    tokens = [(p, 1.0, features[0, p]) for p in keep]
    for a in anchors:
        members = sorted(rest[m] for m in groups[a])
        mean = features[0, [rest[m] for m in groups[a]]].mean(dim=0)
        tokens.append((members[(len(members) - 1) // 2], float(len(members)), mean))
    tokens.sort(key=lambda t: t[0])
    return tokens


def _rope(x, positions, base):
    half = x.shape[-1] // 2
    inv = 1.0 / (base ** (torch.arange(0, x.shape[-1], 2, dtype=torch.float64) / x.shape[-1]))
    angles = positions.double()[:, None] * inv[None]
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _llama_logits(model, embeds, positions, bias_per_layer):
    llm, cfg = model.get_model(), model.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    h = embeds
    for index, layer in enumerate(llm.layers):
        attn, x = layer.self_attn, layer.input_layernorm(h)
        L = x.shape[0]
        q = attn.q_proj(x).view(L, heads, head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(L, heads, head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(L, heads, head_dim).transpose(0, 1)
        q, k = _rope(q, positions, cfg.rope_theta), _rope(k, positions, cfg.rope_theta)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias_per_layer(index)
        out = torch.softmax(scores, dim=-1) @ v
        h = h + attn.o_proj(out.transpose(0, 1).reshape(L, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(llm.norm(h))


@pytest.mark.parametrize("base,n_vis", [("HoloV", 64), ("DivPrune", 128), ("VisPruner", 48)])
def test_prefill_and_first_decode_step_match_restatement(small_model, make_inputs, synthetic_image, base, n_vis):
    tok, model, proc = small_model
    ids, images = make_inputs(tok, proc, "What is on the left?", synthetic_image(5, (500, 280)), model_config=model.config)
    at = (ids[0] == IMAGE_TOKEN_INDEX).nonzero().item()
    text_before, text_after = ids[0, :at], ids[0, at + 1:]
    with torch.inference_mode():
        tokens = _reduced_tokens(model, images, base, n_vis)
        embed = model.get_model().embed_tokens
        embeds = torch.cat([embed(text_before), torch.stack([t[2] for t in tokens]), embed(text_after)])
        positions = torch.cat([torch.arange(at), at + torch.tensor([t[0] for t in tokens]),
                               at + 576 + torch.arange(len(text_after))])
        sizes = torch.cat([torch.ones(at), torch.tensor([t[1] for t in tokens]), torch.ones(len(text_after))])
        visual = torch.zeros(len(sizes), dtype=torch.bool)
        visual[at:at + n_vis] = True
        uniform = torch.where(visual, torch.tensor(576 / n_vis), torch.tensor(1.0))
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        inv = 1.0 / (model.config.rope_theta ** (torch.arange(0, head_dim, 2).double() / head_dim))

        def rho(d):
            return torch.cos(d.double()[..., None] * inv).mean(-1)

        # one decoding step: the greedy token, at the full-length position, with log sizes only
        prefill_len = len(sizes)
        def bias(layer_sizes, decode):
            n = prefill_len + int(decode)
            p = torch.cat([positions, positions[-1:] + 1]) if decode else positions
            s = torch.cat([layer_sizes, torch.ones(1)]) if decode else layer_sizes
            d = (p[:, None] - p[None, :]).clamp(min=0)
            b = torch.log(s)[None, :].double() + torch.log(2 - rho(d))
            if decode:
                b[-1] = torch.log(s).double()
            b = b.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            return b.float()

        expected = _llama_logits(model, embeds, positions, lambda i: bias(uniform if i == 0 else sizes, False))
        next_token = expected[-1].argmax()
        expected_step = _llama_logits(model, torch.cat([embeds, embed(next_token[None])]),
                                      torch.cat([positions, positions[-1:] + 1]),
                                      lambda i: bias(uniform if i == 0 else sizes, True))[-1]
        # The restatement's positions are those of stock LLaVA's full sequence: every token of size one
        # (text, kept patches) sits where stock LLaVA puts the same embedding, and the decoded token comes
        # right after the full-length prompt.
        stock = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images)[4][0]
        single = sizes == 1
        torch.testing.assert_close(stock[positions[single]], embeds[single], rtol=1e-5, atol=1e-5)
        assert int(positions[-1]) + 1 == stock.shape[0]

        restore.apply(model, base=base, n_vis=n_vis, restore=True)
        try:
            out = model(input_ids=ids, images=images, use_cache=True)
            step = model(input_ids=next_token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
        finally:
            restore.remove(model)
    torch.testing.assert_close(out.logits[0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step.logits[0, -1], expected_step, rtol=1e-4, atol=1e-4)
