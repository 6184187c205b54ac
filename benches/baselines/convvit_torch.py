"""PyTorch reference of the official fine-tuning model (``models_convvit.ConvViT``, global pool).

Written from the project spec (/work/shared/spec/convmae.md, section 4), not copied from the
official repository, on the blocks of ``convmae_torch.py``. It keeps the official state_dict
names (207 tensors at ConvMAE-B, spec 4.1):

  * the pretraining encoder's patch embeds and blocks, unmasked; ``pos_embed`` learnable;
  * DropPath (timm's: a kept sample is scaled by 1 / keep) on every block branch, the rates
    ``linspace(0, drop_path, 15)`` over all blocks in order;
  * mean of the stage-3 tokens -> ``fc_norm`` (LayerNorm eps 1e-6) -> ``head``;
  * AdamW param groups as ``util/lr_decay.param_groups_lrd``: layer ids 0 (pos_embed, patch
    embeds, blocks1-2), i + 1 (blocks3.i), depth[2] + 1 (fc_norm, head); lr scale
    ``layer_decay^(depth[2] + 1 - id)``; no weight decay on 1-D tensors and pos_embed.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
import torch.nn as nn

from convmae_torch import CBlock, Block, PatchEmbed, _triple, sincos_pos_embed_2d

__all__ = ["ConvViT", "finetune_param_groups", "soft_target_cross_entropy"]


class DropPath(nn.Module):
    """timm's stochastic depth: per sample, the branch kept with probability 1 - p and scaled by 1 / (1 - p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.floor(keep + torch.rand(shape, dtype=x.dtype, device=x.device))
        return x / keep * mask


class FinetuneCBlock(CBlock):
    """The conv block with stochastic depth on both branches."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float):
        super().__init__(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, keep=None) -> torch.Tensor:
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self._ln(self.norm1, x)))))
        return x + self.drop_path(self.mlp(self._ln(self.norm2, x)))


class FinetuneBlock(Block):
    """The transformer block with stochastic depth on both branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__(dim, num_heads, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvViT(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: Sequence[int] = (4, 2, 2),
        in_chans: int = 3,
        embed_dim: Sequence[int] = (256, 384, 768),
        depth: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        mlp_ratio: Sequence[float] = (4, 4, 4),
        num_classes: int = 1000,
        drop_path: float = 0.1,
    ):
        super().__init__()
        p = [int(v) for v in _triple(patch_size)]
        e = [int(v) for v in _triple(embed_dim)]
        d = [int(v) for v in _triple(depth)]
        r = [float(v) for v in _triple(mlp_ratio)]
        total = p[0] * p[1] * p[2]
        if img_size % total != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of the total stride {total}")
        self.img_size = img_size
        self.depth = d
        grid = img_size // total
        blocks = sum(d)
        rates = [drop_path * i / (blocks - 1) if blocks > 1 else 0.0 for i in range(blocks)]  # linspace(0, drop_path, blocks)
        self.patch_embed1 = PatchEmbed(in_chans, e[0], p[0])
        self.patch_embed2 = PatchEmbed(e[0], e[1], p[1])
        self.patch_embed3 = PatchEmbed(e[1], e[2], p[2])
        self.patch_embed4 = nn.Linear(e[2], e[2])
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(e[2], grid).to(torch.float32).unsqueeze(0))
        self.blocks1 = nn.ModuleList([FinetuneCBlock(e[0], r[0], rates[i]) for i in range(d[0])])
        self.blocks2 = nn.ModuleList([FinetuneCBlock(e[1], r[1], rates[d[0] + i]) for i in range(d[1])])
        self.blocks3 = nn.ModuleList([FinetuneBlock(e[2], num_heads, r[2], rates[d[0] + d[1] + i]) for i in range(d[2])])
        self.fc_norm = nn.LayerNorm(e[2], eps=1e-6)
        self.head = nn.Linear(e[2], num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed1(imgs)
        for blk in self.blocks1:
            x = blk(x)
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x)
        x = self.patch_embed3(x).flatten(2).transpose(1, 2)
        x = self.patch_embed4(x) + self.pos_embed
        for blk in self.blocks3:
            x = blk(x)
        return self.head(self.fc_norm(x.mean(dim=1)))


def _layer_id(name: str, stage3_depth: int) -> int:
    if name == "pos_embed" or name.startswith(("patch_embed", "blocks1.", "blocks2.")):
        return 0
    if name.startswith("blocks3."):
        return int(name.split(".")[1]) + 1
    return stage3_depth + 1


def finetune_param_groups(model: ConvViT, weight_decay: float = 0.05, layer_decay: float = 0.65) -> List[Dict[str, Any]]:
    """AdamW groups by (layer id, decayed or not), each with its ``lr_scale`` (the caller sets
    ``lr = base_lr * lr_scale``)."""
    top = model.depth[2] + 1
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim == 1 or name == "pos_embed")
        layer = _layer_id(name, model.depth[2])
        key = (layer, decays)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decays else 0.0, "lr_scale": layer_decay ** (top - layer)}
        groups[key]["params"].append(param)
    return list(groups.values())


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy: the mean over samples of -sum(targets * log_softmax(logits))."""
    return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()
