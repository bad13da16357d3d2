"""CF-ViT (Chen et al., AAAI 2023, "CF-ViT: A General Coarse-to-Fine Method for Vision Transformer")
on any timm vision transformer with absolute position embeddings and a class token (ViT, DeiT, EVA
without rotary embeddings). One network reads the image twice:

    coarse   the image shrunk so that its token grid is h x w (the paper: 7 x 7, 112 px for a
             patch-16 network whose full grid is 14 x 14): tokens z_c, logits y_c. The class token's
             attention to the patch tokens, averaged over heads, is followed over the ranking layers
             with an exponential moving average, g <- d * g + (1 - d) * a_l (g = 0 before the first;
             the paper's layers 4..12 of 12, d = 0.99): the token score.
    fine     the ceil(share * h * w) best-scored coarse tokens are re-split into their 2 x 2 tokens
             of the full image (grid 2h x 2w); every other token keeps its coarse embedding (the
             coarse patch embedding with the coarse grid's position embedding). With feature reuse,
             every fine patch embedding first gets r = MLP(LN(z_c)) of the coarse final token it lies
             in (nearest upsampling to the fine grid): the coarse pass's features enter the fine pass.
             Logits y_f.
    exit     at inference, an image whose coarse confidence max softmax(y_c) reaches the threshold
             stops after the coarse pass.

The reference code (ChenMnZ/CF-ViT, `deit/models_deit.py`, `deit/engine_deit.py`) was read for the
details above and for training: loss = CE(y_f) + KL(softmax(sg(y_f)) || softmax(y_c)) (the coarse pass
learns only by distillation from the fine one; `CfvitLoss` in fgvc/engine/losses.py), and the fine
pass re-splits EVERY token for the first two thirds of training (epochs 0..200 of 300), then only the
top share (`CfvitSchedule`). Where fgvc differs, and why:
- one position-embedding table, the backbone's, resampled (bicubic, timm) to the coarse grid; the
  reference learns one table per grid from scratch on ImageNet, fgvc fine-tunes pretrained networks;
- the coarse image is shrunk with the antialiased bilinear filter (fgvc/models/resample.py's one
  `shrink`), the reference interpolates bilinearly without antialiasing (align_corners=True);
- the re-split and the kept tokens are put in raster order (the reference: score order). A
  transformer with absolute position embeddings is equivariant to the order, so this only changes
  float rounding, and with every token re-split and no reuse the fine pass is exactly the plain
  network on the full image.

The class attention needs the attention matrix, which timm's fused scaled-dot-product attention never
forms: during the coarse pass the ranking layers' attention modules run timm's own unfused path
(`explicit_attention`: softmax(q k^T / sqrt(d)) is computed), and a forward hook on their `attn_drop`
(applied to that matrix) records the class token's row. Every other layer, and the whole fine pass,
keeps the fused kernel.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fgvc.errors import UserError
from fgvc.models.classifier import create_backbone
from fgvc.models.dcn import NEVER_EXIT, escalate
from fgvc.models.resample import shrink

PAPER_FIRST_RANK_LAYER = 3  # the paper ranks with blocks 3..11 (0-based) of DeiT-S's 12: the fourth to the last
SPLIT = 2  # a coarse token covers SPLIT x SPLIT fine tokens


# --- the method's pure functions ---------------------------------------------------------------


def class_attention(attn: Tensor, num_prefix_tokens: int) -> Tensor:
    """(B, heads, N, N) softmaxed attention -> (B, N - P): the class token's (row 0) attention to each
    patch token, averaged over heads."""
    return attn[:, :, 0, num_prefix_tokens:].mean(1)


def ema_over_layers(per_layer: list[Tensor], decay: float) -> Tensor:
    """The paper's global class attention: g <- decay * g + (1 - decay) * a_l over the ranking layers
    in order, from g = 0. (B, N) each -> (B, N)."""
    g = torch.zeros_like(per_layer[0])
    for a in per_layer:
        g = decay * g + (1 - decay) * a
    return g


def tokens_for_share(share: float, num_tokens: int) -> int:
    """How many coarse tokens a share re-splits: ceil(share * N), as the reference code counts."""
    return min(num_tokens, math.ceil(share * num_tokens - 1e-9))


def choose_tokens(score: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(B, N) token scores -> (the k best, the N - k others), each (B, .) long in raster order."""
    order = score.argsort(dim=1, descending=True)  # (B, N)
    return order[:, :k].sort(dim=1).values, order[:, k:].sort(dim=1).values


def fine_indices(chosen: Tensor, grid_w: int) -> Tensor:
    """(B, k) indices on the coarse (h, w) grid -> (B, 4k) indices of their 2 x 2 tokens on the fine
    (2h, 2w) grid, in raster order."""
    rows, cols = chosen // grid_w, chosen % grid_w  # (B, k)
    dr = torch.tensor([0, 0, 1, 1], device=chosen.device)
    dc = torch.tensor([0, 1, 0, 1], device=chosen.device)
    fine = (SPLIT * rows[..., None] + dr) * (SPLIT * grid_w) + SPLIT * cols[..., None] + dc  # (B, k, 4)
    return fine.flatten(1).sort(dim=1).values  # (B, 4k)


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """(B, N, C) tokens, (B, n) indices -> (B, n, C)."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


@contextmanager
def explicit_attention(modules: Iterable[nn.Module]) -> Iterator[None]:
    """timm attention modules among `modules` compute their attention matrix (the unfused path:
    softmax(q k^T * scale), then `attn_drop`) instead of fused scaled-dot-product attention; restored
    on exit. The coarse pass's ranking layers need the matrix; torch's FLOP counter counts nothing
    for the fused kernel on the CPU, so FLOP counts of transformers run under it too."""
    saved = [(m, m.fused_attn) for m in modules if hasattr(m, "fused_attn")]
    for m, _ in saved:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, fused in saved:
            m.fused_attn = fused


# --- outputs and the training schedule ---------------------------------------------------------


@dataclass
class CfvitOutput:
    logits: Tensor  # (B, K) the prediction: fine pass (at inference, the coarse one for images that exit)
    coarse_logits: Tensor | None = None  # (B, K) coarse pass; None when the fine pass ran alone
    fine_logits: Tensor | None = None  # (B, K) fine pass; None for the coarse pass alone
    chosen: Tensor | None = None  # (B, k) long: coarse-grid indices (row * w + col) re-split into 2 x 2 tokens
    class_attention: Tensor | None = None  # (B, h, w) the EMA class attention that ranked the coarse tokens

    def named_logits(self) -> dict[str, Tensor]:
        named = {} if self.coarse_logits is None else {"coarse": self.coarse_logits}
        return named | ({} if self.fine_logits is None else {"fine": self.fine_logits})


@dataclass(frozen=True)
class CfvitStep:
    """What one training update does (asked of `CfvitSchedule` by the training loop)."""

    select: bool  # the fine pass re-splits only the recipe's share of the tokens (else every token)


@dataclass
class CfvitSchedule:
    """The reference code's two stages, counted in optimizer updates: every token re-split for the
    first `select_updates`, then only the top share."""

    select_updates: int

    def phase(self, update: int) -> CfvitStep:
        return CfvitStep(select=update >= self.select_updates)


@dataclass
class CoarsePass:
    """What the fine pass reads from the coarse one, per image."""

    prefix: Tensor  # (B, P, C) class (and register) tokens with their position embedding
    tokens: Tensor  # (B, N, C) embedded coarse patch tokens (patch embedding + coarse position embedding)
    features: Tensor  # (B, N, C) the coarse pass's final patch tokens (after the final norm)
    logits: Tensor  # (B, K)
    score: Tensor  # (B, N) EMA class attention

    def rows(self, index: Tensor) -> CoarsePass:
        return CoarsePass(*(getattr(self, f.name)[index] for f in fields(self)))


# --- the model ---------------------------------------------------------------------------------


class CFViT(nn.Module):
    """One timm vision transformer run coarse-to-fine (module docstring).

    `forward(x, phase=None, tokens=None)` returns a `CfvitOutput`; `tokens` re-splits that many coarse
    tokens (0: the coarse pass alone; h * w: every token) instead of the recipe's share."""

    def __init__(self, backbone: str, num_classes: int, image_size: int, coarse_grid: int = 0, share: float = 0.5,
                 rank_layers: list[int] | tuple[int, ...] = (), rank_decay: float = 0.99, reuse: bool = True,
                 exit_threshold: float = NEVER_EXIT, pretrained: bool = False, weights: str = "",
                 drop_rate: float = 0.0, drop_path: float = 0.0, backbone_args: dict | None = None) -> None:
        super().__init__()
        net, names = create_backbone(backbone, num_classes, pretrained, weights, image_size, drop_rate=drop_rate,
                                     drop_path_rate=drop_path, **(backbone_args or {}))
        if getattr(net, "patch_embed", None) is None:
            raise UserError(f"model.backbone '{backbone}' is not a vision transformer; model.arch=cfvit needs a "
                            "timm ViT, DeiT or EVA such as deit_small_patch16_224 or test_vit.")
        for needed in ("blocks", "pos_embed", "cls_token"):
            if getattr(net, needed, None) is None:
                raise UserError(f"model.backbone '{backbone}' has no {needed}; model.arch=cfvit ranks tokens by the "
                                "class token's attention with absolute position embeddings: use a ViT or DeiT.")
        if getattr(net, "rope", None) is not None:
            raise UserError(f"model.backbone '{backbone}' uses rotary position embeddings, which model.arch=cfvit "
                            "does not resample for mixed coarse and fine tokens; use a ViT, DeiT or EVA-01.")
        net.patch_embed.strict_img_size = False  # the coarse pass feeds it a smaller image
        self.net = net
        self.pretrained_names = {f"net.{n}" for n in names}
        self.num_prefix_tokens = net.num_prefix_tokens
        self.patch = net.patch_embed.patch_size[0]
        fine_h, fine_w = net.patch_embed.grid_size
        if fine_h != fine_w or fine_h % SPLIT:
            raise UserError(f"data.image_size={image_size} gives a {fine_h} x {fine_w} token grid; model.arch=cfvit "
                            f"needs an even square grid: use a multiple of {SPLIT * self.patch}.")
        self.grid = coarse_grid or fine_h // SPLIT  # coarse grid side
        if self.grid * SPLIT != fine_h:
            raise UserError(f"model.cfvit.coarse_grid={coarse_grid} needs the fine grid {SPLIT * coarse_grid} x "
                            f"{SPLIT * coarse_grid}: set data.image_size={SPLIT * coarse_grid * self.patch} "
                            f"(or model.cfvit.coarse_grid=0).")
        self.num_coarse = self.grid * self.grid
        depth = len(net.blocks)
        self.rank_layers = sorted(rank_layers) if rank_layers else list(range(min(PAPER_FIRST_RANK_LAYER, depth - 1),
                                                                             depth))
        if not all(0 <= i < depth for i in self.rank_layers):
            raise UserError(f"model.cfvit.rank_layers {list(rank_layers)} must be block indices in 0..{depth - 1}.")
        for i in self.rank_layers:
            attn = net.blocks[i].attn
            if not (hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), nn.Module)):
                raise UserError(f"block {i} of '{backbone}' has no timm attention module whose matrix can be read; "
                                "use a ViT, DeiT or EVA backbone.")
        self.share, self.rank_decay, self.exit_threshold = share, rank_decay, exit_threshold
        self.top_k = tokens_for_share(share, self.num_coarse)
        dim = net.embed_dim
        if reuse:  # the reference's reuse block: LayerNorm, then an MLP as wide as the blocks'
            hidden = getattr(getattr(net.blocks[0], "mlp", None), "fc1", None)
            hidden = hidden.out_features if isinstance(hidden, nn.Linear) else 4 * dim
            self.reuse = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), Mlp(dim, hidden, dim, act_layer=nn.GELU, drop=drop_rate))
            for m in self.reuse.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        else:
            self.reuse = None

    # --- embedding ---------------------------------------------------------------------------

    def _prefix_pos(self) -> int:
        """How many rows of pos_embed belong to prefix tokens (none when the network adds them after)."""
        return 0 if getattr(self.net, "no_embed_class", False) else self.num_prefix_tokens

    def prefix_tokens(self, batch: int) -> Tensor:
        """(B, P, C) class, distillation (DeiT) and register tokens in timm's order, with their position
        embedding if the network has one."""
        net = self.net
        extra = (getattr(net, "dist_token", None), getattr(net, "reg_token", None))
        prefix = torch.cat([t.expand(batch, -1, -1) for t in (net.cls_token, *extra) if t is not None], 1)  # (B, P, C)
        n = self._prefix_pos()
        return prefix + net.pos_embed[:, :n] if n else prefix

    def grid_pos(self, side: int) -> Tensor:
        """(1, side * side, C) the patch position embedding resampled to a side x side grid."""
        pos = self.net.pos_embed[:, self._prefix_pos():]
        return resample_abs_pos_embed(pos, new_size=[side, side], old_size=list(self.net.patch_embed.grid_size),
                                      num_prefix_tokens=0)

    def patch_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, H/p * W/p, C) patch embeddings, no position embedding."""
        x = self.net.patch_embed(images)
        return x.flatten(1, 2) if x.ndim == 4 else x  # NHWC patch embeds

    def run(self, prefix: Tensor, patches: Tensor, record: list[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """timm's forward_features after the position embedding: (B, P, C), (B, N, C) -> final tokens
        (B, P + N, C) after the last norm, and the class attention (B, N) of each block in `record`."""
        net = self.net
        x = net.pos_drop(torch.cat([prefix, patches], 1))  # (B, P + N, C)
        for step in (getattr(net, "patch_drop", None), getattr(net, "norm_pre", None)):  # EVA may have neither
            x = x if step is None else step(x)
        rows: list[Tensor] = []
        attns = [net.blocks[i].attn for i in record]
        hooks = [a.attn_drop.register_forward_hook(
            lambda m, inputs, out: rows.append(class_attention(inputs[0].detach(), self.num_prefix_tokens)))
            for a in attns]
        checkpointed = getattr(net, "grad_checkpointing", False) and torch.is_grad_enabled()
        try:
            with explicit_attention(attns):
                for i, blk in enumerate(net.blocks):
                    if checkpointed and i not in record:  # train.grad_checkpointing; the ranking blocks are kept
                        x = checkpoint(blk, x, use_reentrant=False)
                    else:
                        x = blk(x)
        finally:
            for h in hooks:
                h.remove()
        return net.norm(x), rows

    # --- the two passes ----------------------------------------------------------------------

    def coarse_pass(self, x: Tensor) -> CoarsePass:
        """The image shrunk to the coarse grid: (B, 3, H, W) -> CoarsePass."""
        small = shrink(x, self.grid * self.patch)  # (B, 3, h p, w p)
        prefix = self.prefix_tokens(x.shape[0])  # (B, P, C)
        tokens = self.patch_tokens(small) + self.grid_pos(self.grid)  # (B, N, C)
        z, rows = self.run(prefix, tokens, self.rank_layers)  # (B, P + N, C)
        logits = self.net.forward_head(z)  # (B, K)
        score = ema_over_layers(rows, self.rank_decay)  # (B, N)
        return CoarsePass(prefix, tokens, z[:, self.num_prefix_tokens:], logits, score)

    def fine_pass(self, x: Tensor, coarse: CoarsePass | None, k: int) -> tuple[Tensor, Tensor]:
        """The k best-scored coarse tokens re-split into full-resolution tokens: (B, 3, H, W) ->
        (logits (B, K), chosen (B, k) coarse indices). `coarse` may be None only when every token is
        re-split and feature reuse is off."""
        b = x.shape[0]
        fine = self.patch_tokens(x)  # (B, 4N, C)
        if self.reuse is not None:
            r = self.reuse(coarse.features)  # (B, N, C)
            r = r.transpose(1, 2).reshape(b, -1, self.grid, self.grid)  # (B, C, h, w)
            r = F.interpolate(r, scale_factor=SPLIT, mode="nearest")  # (B, C, 2h, 2w)
            fine = fine + r.flatten(2).transpose(1, 2)  # (B, 4N, C)
        fine = fine + self.grid_pos(SPLIT * self.grid)  # (B, 4N, C)
        if k >= self.num_coarse:
            patches = fine
            chosen = torch.arange(self.num_coarse, device=x.device).expand(b, -1)  # (B, N)
        else:
            chosen, kept = choose_tokens(coarse.score, k)  # (B, k), (B, N - k)
            patches = torch.cat([gather_tokens(fine, fine_indices(chosen, self.grid)),  # (B, 4k, C)
                                 gather_tokens(coarse.tokens, kept)], 1)  # (B, 4k + N - k, C)
        prefix = coarse.prefix if coarse is not None else self.prefix_tokens(b)
        z, _ = self.run(prefix, patches)
        return self.net.forward_head(z), chosen

    def needs_coarse(self, k: int) -> bool:
        return k < self.num_coarse or self.reuse is not None

    def forward_every_token(self, x: Tensor) -> Tensor:
        """The reference path: every token re-split (the coarse pass runs only if reuse needs it)."""
        coarse = self.coarse_pass(x) if self.needs_coarse(self.num_coarse) else None
        return self.fine_pass(x, coarse, self.num_coarse)[0]

    def forward(self, x: Tensor, phase: CfvitStep | None = None, tokens: int | None = None) -> CfvitOutput:
        if tokens is not None:
            k = tokens
        elif self.training and phase is not None and not phase.select:
            k = self.num_coarse
        else:
            k = self.top_k
        coarse = self.coarse_pass(x)
        score = coarse.score.view(-1, self.grid, self.grid)  # (B, h, w)
        if k == 0:
            return CfvitOutput(coarse.logits, coarse_logits=coarse.logits, class_attention=score)
        fine_logits, chosen = self.fine_pass(x, coarse, k)
        logits = fine_logits
        if not self.training and self.exit_threshold <= 1:  # early exit without a host sync
            logits = torch.where(escalate(coarse.logits, self.exit_threshold)[:, None], fine_logits, coarse.logits)
        return CfvitOutput(logits, coarse_logits=coarse.logits, fine_logits=fine_logits, chosen=chosen,
                           class_attention=score)

    @torch.no_grad()
    def early_exit(self, x: Tensor, threshold: float, tokens: int | None = None) -> tuple[Tensor, Tensor]:
        """Inference that saves the fine work: only escalated images take the fine pass. Returns (B, K)
        logits and the (B,) bool escalation mask. The batch shrinks to the escalated images, which
        needs their count on the host: this is the method to time, not `forward`."""
        k = self.top_k if tokens is None else tokens
        coarse = self.coarse_pass(x)
        escalated = escalate(coarse.logits, threshold)  # (B,)
        rows = escalated.nonzero().squeeze(1)  # (E,)
        if rows.numel() == 0 or k == 0:
            return coarse.logits, escalated
        fine, _ = self.fine_pass(x[rows], coarse.rows(rows), k)  # (E, K)
        return coarse.logits.index_copy(0, rows, fine), escalated
