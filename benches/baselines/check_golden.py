"""Checks benches/baselines/convmae_torch.py against the official float64 golden fixture.

    python benches/baselines/check_golden.py [--fixture PATH] [--tol 1e-9]

Builds the model in float64 from the fixture's ``config`` metadata and ``param.*`` tensors, runs
forward with ``input.noise`` and backward, and compares loss, pred, latent, mask, ids_restore,
the stage activations and every ``grad.*`` with relative error max|ours-ref| / max|ref|.
Prints one JSON line; exits 1 when anything is above the tolerance (or missing).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convmae_torch import from_config, from_preset, sincos_pos_embed_2d  # noqa: E402

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_safetensors(path: str):
    """Reads a safetensors file: u64 LE header length, JSON header, raw little-endian data."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        buf = bytearray(blob[base + start:base + end])
        t = torch.frombuffer(buf, dtype=dtype) if len(buf) else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"]).clone()
    return meta, tensors


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours = ours.detach().to(torch.float64)
    ref = ref.to(torch.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    denom = ref.abs().max().item()
    num = (ours - ref).abs().max().item()
    if denom == 0.0:
        return num
    return num / denom


def load_fixture_params(model, t: dict, problems: list) -> dict:
    """Loads fixture ``t``'s ``param.*`` tensors into ``model`` (strict=False), naming in
    ``problems`` what either side lacks; returns them by model name."""
    params = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
    missing, unexpected = model.load_state_dict(params, strict=False)
    if missing:
        problems.append(f"model tensors absent from the fixture: {missing}")
    if unexpected:
        problems.append(f"fixture tensors the model lacks: {unexpected}")
    return params


def compare_grads(named: dict, t: dict, names: list, results: dict, problems: list):
    """Each ``grad.*`` of fixture ``t`` against the gradient of its parameter in ``named`` (relative
    error into ``results``); ``names``: the parameters the fixture should hold gradients of.
    Returns the grad keys, the worst error and its key."""
    grad_keys = sorted(k for k in t if k.startswith("grad."))
    if sorted(k[len("grad."):] for k in grad_keys) != sorted(names):
        problems.append("the fixture's grad.* names differ from the model's trainable parameters")
    worst, worst_name = 0.0, None
    for k in grad_keys:
        p = named.get(k[len("grad."):])
        if p is None or p.grad is None:
            problems.append(f"no gradient for {k}")
            continue
        e = rel_err(p.grad, t[k])
        results[k] = e
        if e >= worst:
            worst, worst_name = e, k
    return grad_keys, worst, worst_name


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    default_fixture = os.path.normpath(os.path.join(here, "..", "..", "..", "shared", "golden", "pretrain_small.safetensors"))
    if not os.path.exists(default_fixture):
        default_fixture = "/work/shared/golden/pretrain_small.safetensors"
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default=os.environ.get("CONVMAE_GOLDEN_PRETRAIN", default_fixture))
    ap.add_argument("--tol", type=float, default=1e-9)
    args = ap.parse_args()

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    meta, t = load_safetensors(args.fixture)
    cfg = json.loads(meta["config"])
    model = from_config(cfg).to(torch.float64)

    problems = []
    params = load_fixture_params(model, t, problems)

    results = {}
    # our sin-cos table against the fixture's frozen ones (not a parity requirement, a sanity check)
    results["sincos.pos_embed"] = rel_err(sincos_pos_embed_2d(model.pos_embed.shape[-1], model.grid).unsqueeze(0), params["pos_embed"])
    results["sincos.decoder_pos_embed"] = rel_err(
        sincos_pos_embed_2d(model.decoder_pos_embed.shape[-1], model.grid).unsqueeze(0), params["decoder_pos_embed"])

    acts = {}
    model.zero_grad(set_to_none=True)
    loss, pred, mask = model(t["input.imgs"], noise=t["input.noise"], acts=acts)
    loss.backward()

    results["loss"] = rel_err(loss.reshape(1), t["output.loss"])
    results["pred"] = rel_err(pred, t["output.pred"])
    results["latent"] = rel_err(acts["latent"], t["output.latent"])
    results["mask"] = rel_err(mask, t["output.mask"])
    results["ids_restore"] = float((acts["ids_restore"] != t["output.ids_restore"]).sum().item())
    for name in ("stage1", "stage2", "stage3_tokens"):
        if f"act.{name}" in t:
            results[f"act.{name}"] = rel_err(acts[name], t[f"act.{name}"])

    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    grad_keys, grad_worst, grad_worst_name = compare_grads(named, t, trainable, results, problems)

    # ConvMAE-B: every parameter name, shape and trainable flag, in registration order, against the
    # official model's manifest (when the file is beside the fixture).
    manifest_path = os.path.join(os.path.dirname(args.fixture), "convmae_base_manifest.json")
    manifest_match = None
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            ref = [(x["name"], list(x["shape"]), bool(x["trainable"])) for x in json.load(f)["pretrain"]["tensors"]]
        with torch.device("meta"):
            base = from_preset("convmae-base")
        ours = [(n, list(p.shape), p.requires_grad) for n, p in base.named_parameters()]
        manifest_match = ours == ref
        if not manifest_match:
            problems.append("convmae-base parameters differ from convmae_base_manifest.json")

    checked = {k: v for k, v in results.items() if not k.startswith("sincos.")}
    failed = sorted(k for k, v in checked.items() if not (v <= args.tol))
    ok = not failed and not problems
    out = {
        "check": "golden-pretrain",
        "impl": "pytorch",
        "torch": torch.__version__,
        "fixture": os.path.basename(args.fixture),
        "tol": args.tol,
        "ok": ok,
        "loss": loss.item(),
        "loss_ref": t["output.loss"].item(),
        "rel": {
            "loss": results["loss"],
            "pred": results["pred"],
            "latent": results["latent"],
            "mask": results["mask"],
            "ids_restore_mismatches": results["ids_restore"],
            "act.stage1": results.get("act.stage1"),
            "act.stage2": results.get("act.stage2"),
            "act.stage3_tokens": results.get("act.stage3_tokens"),
            "grad_max": grad_worst,
            "grad_max_name": grad_worst_name,
            "grads_checked": len(grad_keys),
            "sincos_pos_embed": results["sincos.pos_embed"],
            "sincos_decoder_pos_embed": results["sincos.decoder_pos_embed"],
        },
        "base_manifest_match": manifest_match,
        "failed": failed,
        "problems": problems,
    }
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
