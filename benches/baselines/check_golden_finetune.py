"""Checks benches/baselines/convvit_torch.py (the fine-tuning baseline) against the official
float64 golden fine-tune fixture, as check_golden.py checks the pretraining model.

    python benches/baselines/check_golden_finetune.py [--fixture PATH] [--tol 1e-9]

Builds ConvViT in float64 from the fixture's ``config`` and ``param.*`` tensors, runs it in
evaluation mode (drop path off, as the fixture was made) on ``input.imgs``, and compares the
pooled ``fc_norm`` features, the logits, the cross-entropy loss with ``input.labels`` and every
``grad.*`` relative to the largest reference value. With convmae_base_manifest.json beside the
fixture it also compares ConvMAE-B's 207 fine-tune tensor names and shapes. Prints one JSON
line; exit 1 on a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_golden import compare_grads, load_fixture_params, load_safetensors, rel_err  # noqa: E402
from convvit_torch import ConvViT  # noqa: E402


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    default_fixture = os.path.normpath(os.path.join(here, "..", "..", "..", "shared", "golden", "finetune_small.safetensors"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default=os.environ.get("CONVMAE_GOLDEN_FINETUNE", default_fixture))
    ap.add_argument("--tol", type=float, default=1e-9)
    args = ap.parse_args()

    meta, t = load_safetensors(args.fixture)
    cfg = json.loads(meta["config"])
    model = ConvViT(img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                    num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], num_classes=cfg["num_classes"], drop_path=0.0).to(torch.float64)
    problems = []
    load_fixture_params(model, t, problems)
    model.eval()

    features = {}
    model.fc_norm.register_forward_hook(lambda _m, _i, out: features.setdefault("fc_norm", out))
    logits = model(t["input.imgs"])
    loss = F.cross_entropy(logits, t["input.labels"])
    loss.backward()
    results = {
        "features": rel_err(features["fc_norm"], t["output.features"]),
        "logits": rel_err(logits, t["output.logits"]),
        "loss": rel_err(loss.reshape(1), t["output.loss"]),
    }
    named = dict(model.named_parameters())
    grad_keys, grad_worst, grad_worst_name = compare_grads(named, t, list(named), results, problems)

    manifest_path = os.path.join(os.path.dirname(args.fixture), "convmae_base_manifest.json")
    manifest_match = None
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            ref = [(x["name"], list(x["shape"])) for x in json.load(f)["finetune"]["tensors"]]
        with torch.device("meta"):
            base = ConvViT()
        ours = [(n, list(p.shape)) for n, p in base.named_parameters()]
        manifest_match = sorted(ours) == sorted(ref)
        if not manifest_match:
            problems.append("ConvViT-B parameters differ from convmae_base_manifest.json's fine-tune model")

    failed = sorted(k for k, v in results.items() if not (v <= args.tol))
    ok = not failed and not problems
    print(json.dumps({
        "check": "golden-finetune",
        "impl": "pytorch",
        "torch": torch.__version__,
        "fixture": os.path.basename(args.fixture),
        "tol": args.tol,
        "ok": ok,
        "rel": {"features": results["features"], "logits": results["logits"], "loss": results["loss"],
                "grad_max": grad_worst, "grad_max_name": grad_worst_name, "grads_checked": len(grad_keys)},
        "base_manifest_match": manifest_match,
        "failed": failed,
        "problems": problems,
    }))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
