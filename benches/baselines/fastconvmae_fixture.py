"""Writes a FastConvMAE pretraining fixture in the golden format from ``convmae_torch.py``.

    python benches/baselines/fastconvmae_fixture.py --out test/fixtures/fastconvmae_small.safetensors

FastConvMAE (spec section 8.1) has no golden fixture: the official repository releases no
weights and its code is not run here. ``convmae_torch.py`` computes it the way
``models_fastconvmae.py`` does (stages 1-2 once on dense maps, each conv block's depthwise conv
once per complementary view with its output gated by the view, every view's sequence rolled by
v * len_keep before the one shared unshuffle, the target repeated per view), and its ConvMAE path
passes the official golden fixture (``check_golden.py``). This script runs that model in float64
on a small config (random weights perturbed off the init, so biases and norm affines are
non-trivial) and saves inputs, outputs, activations and gradients under the golden names, with
``complementary_masking`` in the config metadata. ``convmae check-fixture`` reads it like the
golden ones (test/complementary.test.ts).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convmae_torch import from_config  # noqa: E402

CONFIG = dict(
    img_size=64, patch_size=[4, 2, 2], in_chans=3, embed_dim=[8, 12, 16], depth=[2, 1, 2], num_heads=2,
    decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2, mlp_ratio=[4, 4, 4], qkv_bias=True,
    norm_pix_loss=True, mask_ratio=0.75, complementary_masking=True,
)


def save_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    header = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous()
        dtype = {torch.float64: "F64", torch.int64: "I64"}[t.dtype]
        data = t.numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    model = from_config(CONFIG).to(torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    b, n = args.batch, model.num_patches
    imgs = torch.randn(b, 3, CONFIG["img_size"], CONFIG["img_size"], dtype=torch.float64)
    noise = torch.rand(b, n, dtype=torch.float64)
    acts: dict = {}
    loss, pred, mask = model(imgs, noise=noise, acts=acts)
    loss.backward()

    tensors = {f"param.{k}": v for k, v in model.state_dict().items()}
    tensors.update({
        "input.imgs": imgs,
        "input.noise": noise,
        "output.loss": loss.reshape(1),
        "output.pred": pred,
        "output.mask": mask,
        "output.ids_restore": acts["ids_restore"],
        "output.latent": acts["latent"],
        "act.stage1": acts["stage1"],
        "act.stage2": acts["stage2"],
        "act.stage3_tokens": acts["stage3_tokens"],
    })
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors[f"grad.{name}"] = p.grad
    len_keep = int(n * (1 - CONFIG["mask_ratio"]))
    meta = dict(CONFIG, kind="pretrain", batch=b, len_keep=len_keep, dtype="float64",
                source="benches/baselines/convmae_torch.py (FastConvMAE's computation), float64, seed %d" % args.seed)
    save_safetensors(args.out, tensors, {"config": json.dumps(meta)})
    print(json.dumps({"out": args.out, "loss": loss.item(), "views": n // len_keep, "tensors": len(tensors)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
