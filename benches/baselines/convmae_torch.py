"""PyTorch reference of the official ConvMAE pretraining model (``MaskedAutoencoderConvViT``).

Written from the project spec (/work/shared/spec/convmae.md, sections 1 and 5), not copied from
the official repository. It keeps the official state_dict names, so a fixture's ``param.*``
tensors (or an official checkpoint's ``model`` dict) load with ``load_state_dict``.

Semantics (spec section 1):
  * PatchEmbed: Conv2d(k, stride k) -> channels-last LayerNorm (eps 1e-5) -> exact GELU.
  * CBlock: x += conv2(dw5x5(keep * conv1(LN(x)))); x += fc2(GELU(fc1(LN(x)))), LN eps 1e-5.
  * Block: the timm ViT block (LN eps 1e-6, qkv with bias, softmax attention, GELU MLP).
  * Masking from ``noise`` by argsort, nearest-upsampled to stage 1 and 2; stage 3 runs on the
    visible tokens; fusion x + s1 + s2 after blocks3, then ``norm``.
  * MAE decoder, norm-pix MSE loss (unbiased variance, eps 1e-6) over the masked patches.

Like the official code, stages 1 and 2 are computed densely (the masked positions are computed
and then ignored); that is the baseline the benchmark compares against.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MaskedAutoencoderConvViT",
    "PRESETS",
    "from_config",
    "from_preset",
    "sincos_pos_embed_2d",
    "param_groups_for_adamw",
]


def _triple(v: Union[int, float, Sequence]) -> list:
    if isinstance(v, (list, tuple)):
        if len(v) != 3:
            raise ValueError(f"expected 3 values, got {v!r}")
        return list(v)
    return [v, v, v]


# --------------------------------------------------------------------------------------------
# fixed 2-D sin-cos position embedding (spec 1.8)
# --------------------------------------------------------------------------------------------
def sincos_pos_embed_2d(dim: int, grid: int, dtype=torch.float64) -> torch.Tensor:
    """[grid*grid, dim]; token t = i*grid + j (i = row, j = col).

    channels [0, D/4) sin(j w), [D/4, D/2) cos(j w), [D/2, 3D/4) sin(i w), [3D/4, D) cos(i w),
    with w_k = 10000^(-k / (D/4)).
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos embedding needs dim % 4 == 0, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    idx = torch.arange(grid * grid, dtype=torch.int64)
    row = (idx // grid).to(torch.float64)
    col = (idx % grid).to(torch.float64)
    a = col[:, None] * omega[None, :]
    b = row[:, None] * omega[None, :]
    out = torch.cat([torch.sin(a), torch.cos(a), torch.sin(b), torch.cos(b)], dim=1)
    return out.to(dtype)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Conv2d(k, stride k) -> LayerNorm over channels (eps 1e-5) -> GELU."""

    def __init__(self, in_chans: int, embed_dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.act(x)


class CMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CBlock(nn.Module):
    """Conv block; ``attn`` is the 5x5 depthwise conv (registration order as the official one)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = CMlp(dim, int(dim * mlp_ratio))

    @staticmethod
    def _ln(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, keep=None) -> torch.Tensor:
        """``keep``: None, one [B, 1, H, W] keep map (ConvMAE), or FastConvMAE's list of
        complementary keep maps: the depthwise conv once per view, each output kept where its
        view is visible, summed."""
        h = self.conv1(self._ln(self.norm1, x))
        if isinstance(keep, (list, tuple)):
            h = sum(k * self.attn(k * h) for k in keep)
        else:
            if keep is not None:
                h = keep * h
            h = self.attn(h)
        x = x + self.conv2(h)
        x = x + self.mlp(self._ln(self.norm2, x))
        return x


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # softmax(q k^T * head_dim^-0.5) v; the fused kernel is the same math.
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        y = y.transpose(1, 2).reshape(b, n, c)
        return self.proj(y)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


# --------------------------------------------------------------------------------------------
# the pretraining model
# --------------------------------------------------------------------------------------------
class MaskedAutoencoderConvViT(nn.Module):
    def __init__(
        self,
        img_size: Union[int, Sequence[int]] = 224,
        patch_size: Sequence[int] = (4, 2, 2),
        in_chans: int = 3,
        embed_dim: Sequence[int] = (256, 384, 768),
        depth: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: Union[float, Sequence[float]] = (4, 4, 4),
        qkv_bias: bool = True,
        norm_pix_loss: bool = False,
        mask_ratio: float = 0.75,
        complementary_masking: bool = False,
    ):
        super().__init__()
        # The official signature takes the per-stage input sizes [224, 56, 28]; the first one is the image.
        img = int(img_size[0]) if isinstance(img_size, (list, tuple)) else int(img_size)
        p = [int(v) for v in _triple(patch_size)]
        e = [int(v) for v in _triple(embed_dim)]
        d = [int(v) for v in _triple(depth)]
        r = [float(v) for v in _triple(mlp_ratio)]
        self.patch = p[0] * p[1] * p[2]
        if img % self.patch != 0:
            raise ValueError(f"img_size {img} is not a multiple of the total stride {self.patch}")
        self.img_size = img
        self.patch_sizes = p
        self.in_chans = in_chans
        self.grid = img // self.patch
        self.num_patches = self.grid * self.grid
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        # FastConvMAE (Alpha-VL/FastConvMAE, models_fastconvmae.py): the same weights, each image
        # seen as num_patches / len_keep complementary views.
        self.complementary_masking = complementary_masking

        # ---- encoder
        self.patch_embed1 = PatchEmbed(in_chans, e[0], p[0])
        self.patch_embed2 = PatchEmbed(e[0], e[1], p[1])
        self.patch_embed3 = PatchEmbed(e[1], e[2], p[2])
        self.patch_embed4 = nn.Linear(e[2], e[2])
        self.stage1_output_decode = nn.Conv2d(e[0], e[2], p[1] * p[2], stride=p[1] * p[2])
        self.stage2_output_decode = nn.Conv2d(e[1], e[2], p[2], stride=p[2])
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, e[2]), requires_grad=False)
        self.blocks1 = nn.ModuleList([CBlock(e[0], r[0]) for _ in range(d[0])])
        self.blocks2 = nn.ModuleList([CBlock(e[1], r[1]) for _ in range(d[1])])
        self.blocks3 = nn.ModuleList([Block(e[2], num_heads, r[2], qkv_bias) for _ in range(d[2])])
        self.norm = nn.LayerNorm(e[2], eps=1e-6)

        # ---- decoder (mlp_ratio = mlp_ratio[0], as the official class does)
        self.decoder_embed = nn.Linear(e[2], decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, r[0], qkv_bias) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch * self.patch * in_chans)

        self.initialize_weights()

    # ------------------------------------------------------------------ init (spec 1.9)
    def initialize_weights(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid).unsqueeze(0))
            self.decoder_pos_embed.copy_(
                sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid).unsqueeze(0)
            )
            w = self.patch_embed3.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # every other Conv2d keeps PyTorch's default init

    # ------------------------------------------------------------------ masking (spec 1.4)
    def random_masking(
        self, batch: int, mask_ratio: float, noise: Optional[torch.Tensor], device, dtype
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.num_patches
        len_keep = int(n * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(batch, n, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(batch, n, device=device, dtype=dtype)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_keep, mask, ids_restore

    def _upsample_keep(self, mask: torch.Tensor, factor: int) -> torch.Tensor:
        """1 - mask, nearest-upsampled from the token grid by ``factor``: [B, 1, g*f, g*f]."""
        b = mask.shape[0]
        keep = (1 - mask).reshape(b, 1, self.grid, 1, self.grid, 1)
        keep = keep.expand(b, 1, self.grid, factor, self.grid, factor)
        return keep.reshape(b, 1, self.grid * factor, self.grid * factor)

    # ------------------------------------------------------------------ encoder (spec 1.5)
    def complementary_masking_views(
        self, batch: int, mask_ratio: float, noise: Optional[torch.Tensor], device, dtype
    ) -> Tuple[list, list, torch.Tensor]:
        """FastConvMAE's masks: one argsort per image, split into consecutive runs of len_keep
        (each a view's visible tokens); returns the views' ids_keep and masks, and the one
        ids_restore they share."""
        n = self.num_patches
        len_keep = int(n * (1 - mask_ratio))
        if len_keep == 0 or n % len_keep != 0:
            raise ValueError(f"complementary masking needs len_keep ({len_keep}) to divide the {n} tokens")
        if noise is None:
            noise = torch.rand(batch, n, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep, masks = [], []
        for start in range(0, n, len_keep):
            ids_keep.append(ids_shuffle[:, start:start + len_keep])
            mask = torch.ones(batch, n, device=device, dtype=dtype)
            mask[:, start:start + len_keep] = 0
            masks.append(torch.gather(mask, 1, ids_restore))
        return ids_keep, masks, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None,
                        acts: Optional[Dict[str, torch.Tensor]] = None):
        b = imgs.shape[0]
        f2 = self.patch_sizes[2]
        f1 = self.patch_sizes[1] * f2
        if self.complementary_masking:
            views_keep, masks, ids_restore = self.complementary_masking_views(b, mask_ratio, noise, imgs.device, imgs.dtype)
            keep1 = [self._upsample_keep(m, f1) for m in masks]
            keep2 = [self._upsample_keep(m, f2) for m in masks]
        else:
            ids_keep, mask, ids_restore = self.random_masking(b, mask_ratio, noise, imgs.device, imgs.dtype)
            views_keep, masks = [ids_keep], [mask]
            keep1 = self._upsample_keep(mask, f1)
            keep2 = self._upsample_keep(mask, f2)

        x = self.patch_embed1(imgs)
        for blk in self.blocks1:
            x = blk(x, keep1)
        if acts is not None:
            acts["stage1"] = x
        s1 = self.stage1_output_decode(x).flatten(2).transpose(1, 2)
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x, keep2)
        if acts is not None:
            acts["stage2"] = x
        s2 = self.stage2_output_decode(x).flatten(2).transpose(1, 2)
        x = self.patch_embed3(x).flatten(2).transpose(1, 2)
        x = self.patch_embed4(x)
        x = x + self.pos_embed

        # Each view's visible tokens, the views concatenated along the batch (view-major).
        idx = [k.unsqueeze(-1).expand(-1, -1, x.shape[-1]) for k in views_keep]
        x = torch.cat([torch.gather(x, 1, i) for i in idx])
        s1 = torch.cat([torch.gather(s1, 1, i) for i in idx])
        s2 = torch.cat([torch.gather(s2, 1, i) for i in idx])
        mask = torch.cat(masks)
        for blk in self.blocks3:
            x = blk(x)
        if acts is not None:
            acts["stage3_tokens"] = x
        x = x + s1 + s2
        x = self.norm(x)
        return x, mask, ids_restore

    # ------------------------------------------------------------------ decoder (spec 1.6)
    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        b, k, c = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(b, n - k, c)], dim=1)
        views = b // ids_restore.shape[0]
        if views > 1:
            # FastConvMAE: view v's sequence rolled by v * len_keep, then the shared unshuffle.
            x = torch.cat([torch.roll(part, v * k, 1) for v, part in enumerate(x.chunk(views))])
            ids_restore = ids_restore.repeat(views, 1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, c))
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)

    # ------------------------------------------------------------------ loss (spec 1.7)
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C], patch vector ordered (row, col, channel)."""
        p, g, c = self.patch, self.grid, imgs.shape[1]
        x = imgs.reshape(imgs.shape[0], c, g, p, g, p)
        x = x.permute(0, 2, 4, 3, 5, 1)
        return x.reshape(imgs.shape[0], g * g, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, g = self.patch, self.grid
        c = x.shape[-1] // (p * p)
        x = x.reshape(x.shape[0], g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as torch.var defaults to
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        target = target.repeat(pred.shape[0] // target.shape[0], 1, 1)  # one per view
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: Optional[float] = None,
                noise: Optional[torch.Tensor] = None, acts: Optional[Dict[str, torch.Tensor]] = None):
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise, acts)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        if acts is not None:
            acts["latent"] = latent
            acts["ids_restore"] = ids_restore
        return loss, pred, mask


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
_BASE_KW = dict(patch_size=[4, 2, 2], mlp_ratio=[4, 4, 4], qkv_bias=True, norm_pix_loss=True, mask_ratio=0.75)

PRESETS: Dict[str, Dict[str, Any]] = {
    # the paper's ConvMAE-B (convmae_convvit_base_patch16_dec512d8b)
    "convmae-base": dict(_BASE_KW, img_size=224, embed_dim=[256, 384, 768], depth=[2, 2, 11], num_heads=12,
                         decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "convmae-small": dict(_BASE_KW, img_size=224, embed_dim=[64, 128, 256], depth=[2, 2, 8], num_heads=8,
                          decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "convmae-tiny": dict(_BASE_KW, img_size=64, embed_dim=[32, 64, 128], depth=[1, 1, 4], num_heads=4,
                         decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    # the widths of /work/shared/golden/pretrain_small.safetensors
    "convmae-golden-small": dict(_BASE_KW, img_size=224, embed_dim=[32, 48, 64], depth=[2, 1, 2], num_heads=4,
                                 decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4),
}

_CONFIG_KEYS = (
    "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
    "decoder_depth", "decoder_num_heads", "mlp_ratio", "qkv_bias", "norm_pix_loss", "mask_ratio",
    "complementary_masking",
)


def from_config(cfg: Union[Dict[str, Any], str]) -> MaskedAutoencoderConvViT:
    """Builds the model from a config dict (or its JSON text), e.g. a fixture's ``config`` metadata.

    Keys it does not know (``batch``, ``kind``, ``len_keep``, ``dtype``, ``source``) are ignored;
    ``len_keep``, when present, is checked against the mask ratio.
    """
    if isinstance(cfg, str):
        import json

        cfg = json.loads(cfg)
    kw = {k: cfg[k] for k in _CONFIG_KEYS if k in cfg}
    model = MaskedAutoencoderConvViT(**kw)
    if "len_keep" in cfg:
        want = int(model.num_patches * (1 - model.mask_ratio))
        if int(cfg["len_keep"]) != want:
            raise ValueError(f"config len_keep {cfg['len_keep']} != int({model.num_patches} * (1 - {model.mask_ratio})) = {want}")
    return model


def from_preset(name: str) -> MaskedAutoencoderConvViT:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return from_config(PRESETS[name])


def param_groups_for_adamw(model: nn.Module, weight_decay: float = 0.05):
    """timm 0.3.2 ``add_weight_decay``: no decay on 1-D tensors and ``.bias``; frozen ones left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]
