"""Attention matrices of ViT-family backbones (ViT, DeiT, ViT with registers, EVA-02, BEiT, ...):
recorded, rolled out (Abnar and Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020), and
read from the class token.

timm runs fused scaled-dot-product attention, which never materialises the matrix. `unfused_attention`
switches it off per attention module for as long as the matrices are needed (map extraction), records
A = softmax(Q K^T / sqrt(d)) of every block, (B, heads, N, N), and restores each module's own setting
on exit, also when the body raises: training and plain inference keep the fused kernel.

Attention rollout (the paper, sec. 3): per layer the heads are fused (mean; `max` and `min` are the
variants of the vit-explain code), the identity is added for the residual connection and rows are
renormalised, A' = norm_rows(0.5 * fused + 0.5 * I); the rollout is the product over layers,
R = A'_L ... A'_1. An optional discard ratio zeroes the lowest share of each layer's fused
attention first (never the class token's attention to itself), as in vit-explain.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from fgvc.errors import UserError
from fgvc.models import features as fmaps

HEAD_FUSIONS = ("mean", "max", "min")


def attention_modules(net: nn.Module) -> list[nn.Module]:
    """timm's self-attention modules of `net` in block order (those with a `fused_attn` switch and an
    `attn_drop` applied to the softmaxed matrix)."""
    return [m for m in net.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)]


@contextmanager
def unfused_attention(net: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, every attention module of `net` computes its matrix explicitly and appends
    A (B, heads, N, N), the softmax before dropout, to the yielded list (one entry per block and
    forward, in order). On exit each module's `fused_attn` is what it was before, and the hooks are gone."""
    modules = attention_modules(net)
    if not modules:
        raise UserError(f"backbone '{type(net).__name__}' has no timm self-attention modules, so it has no attention "
                        "matrices; rollout and class-token attention exist for ViT, DeiT and EVA backbones.")
    recorded: list[Tensor] = []
    before = [m.fused_attn for m in modules]
    handles = [m.attn_drop.register_forward_hook(lambda mod, args, out: recorded.append(args[0].detach()))
               for m in modules]
    try:
        for m in modules:
            m.fused_attn = False
        yield recorded
    finally:
        for m, fused in zip(modules, before):
            m.fused_attn = fused
        for handle in handles:
            handle.remove()


def fuse_heads(attention: Tensor, head_fusion: str = "mean") -> Tensor:
    """(B, heads, N, N) -> (B, N, N)."""
    if head_fusion == "mean":
        return attention.mean(1)
    if head_fusion == "max":
        return attention.amax(1)
    if head_fusion == "min":
        return attention.amin(1)
    raise UserError(f"attention head fusion '{head_fusion}' is unknown; use one of {', '.join(HEAD_FUSIONS)}.")


def rollout(attentions: list[Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0) -> Tensor:
    """Attention rollout (Abnar and Zuidema 2020): [(B, heads, N, N)] per layer, first to last ->
    (B, N, N), R = prod_l norm_rows(0.5 * fuse(A_l) + 0.5 * I). Row i says how much each input token
    flows into token i at the output."""
    b, _, n, _ = attentions[0].shape
    eye = torch.eye(n, device=attentions[0].device, dtype=torch.float32)
    result = eye.expand(b, n, n)
    for attention in attentions:
        fused = fuse_heads(attention.float(), head_fusion)  # (B, N, N)
        if discard_ratio > 0:
            flat = fused.flatten(1).clone()  # (B, N*N)
            drop = flat.topk(int(flat.shape[1] * discard_ratio), dim=1, largest=False).indices
            keep_self = flat[:, 0].clone()  # the class token's attention to itself is never discarded
            flat.scatter_(1, drop, 0.0)
            flat[:, 0] = keep_self
            fused = flat.view(b, n, n)
        a = 0.5 * fused + 0.5 * eye  # the residual connection
        a = a / a.sum(-1, keepdim=True)  # rows sum to one
        result = a @ result  # (B, N, N)
    return result


def read_rows(net: nn.Module) -> list[int]:
    """The token rows whose attention explains the prediction: the prefix tokens the head reads (class;
    DeiT: class and distillation), or none (average-pool heads: every patch token's row)."""
    names = fmaps.prefix_names(net)
    if not fmaps.head_reads_token(net):
        return []
    return [i for i, name in enumerate(names) if name in ("class", "distillation")] or [0]


def patch_scores(net: nn.Module, matrix: Tensor, image_size: tuple[int, int], rows: list[int] | None = None) -> Tensor:
    """(B, N, N) attention-like matrix -> (B, h, w): the attention of `rows` (default `read_rows`;
    empty: every patch row) to the patch tokens, on the patch grid (prefix tokens dropped)."""
    p = net.num_prefix_tokens
    rows = read_rows(net) if rows is None else rows
    picked = matrix[:, rows] if rows else matrix[:, p:]  # (B, r, N)
    scores = picked.mean(1)[:, p:]  # (B, N - P)
    h, w = fmaps.grid_size(net, scores.shape[1], image_size)
    return scores.reshape(-1, h, w)


def attention_maps(net: nn.Module, x: Tensor, head_fusion: str = "mean",
                   discard_ratio: float = 0.0) -> dict[str, Tensor]:
    """One forward of `x` (B, 3, H, W) with the matrices recorded -> on the patch grid (B, h, w):
    `rollout` (Abnar and Zuidema 2020) and, when the backbone has a class token, `class_attention`:
    the last layer's class-token attention to the patches, averaged over heads (class-agnostic)."""
    if fmaps.layout(net) != fmaps.NLC:
        raise UserError(f"backbone '{type(net).__name__}' has no token sequence (a CNN or a Swin), so attention "
                        "rollout and class-token attention do not exist for it; use cam or gradcam.")
    size = tuple(x.shape[-2:])
    with torch.no_grad(), unfused_attention(net) as recorded:
        net.forward_features(x)
    out = {"rollout": patch_scores(net, rollout(recorded, head_fusion, discard_ratio), size)}
    if "class" in fmaps.prefix_names(net):
        out["class_attention"] = patch_scores(net, recorded[-1].float().mean(1), size, rows=[0])
    return out
