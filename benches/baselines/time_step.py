"""Times one ConvMAE pretraining step in PyTorch (the baseline of ``npm run bench -- pretrain``),
or with ``--task finetune`` one fine-tuning step (the baseline of ``npm run bench -- finetune``).

    python benches/baselines/time_step.py --preset convmae-base --batch 8 --threads 2 --warmup 2 --steps 5
    python benches/baselines/time_step.py --device cuda --batch 64 --amp bf16 [--compile] [--profile]
    python benches/baselines/time_step.py --task finetune --preset convmae-base --batch 8 --threads 2

A fine-tuning step (convvit_torch.py) is what ``Classifier.train`` does with soft targets: take
a random uint8 batch, normalize it, forward with stochastic depth 0.1, SoftTargetCrossEntropy
against label-smoothed (0.1) one-hot targets of 1000 classes, backward, AdamW (betas 0.9/0.999,
weight decay 0.05) over layer-decay groups (0.65). No mixup or erasing on either side.

A step is what the project's ``Pretrainer.pretrainStep`` does: take a random uint8 [B,H,W,3]
batch, ImageNet-normalize it, draw the mask, forward, backward, AdamW (betas 0.9/0.95,
weight decay 0.05, none on 1-D tensors and biases), in float32 on the CPU by default. On CUDA,
``--amp bf16`` runs forward and loss under ``torch.autocast(bfloat16)`` (PyTorch's mixed
precision: float32 weights and optimizer state) and ``--compile`` wraps the model in
``torch.compile`` (compile time is spent in the warmup steps and not timed).
``--profile`` runs one more step after the timed ones under ``torch.profiler`` (so the timings
are the profiler's overhead free) and adds ``"profile"`` to the JSON line: each CUDA kernel's
name, calls and total device time (``{"kernels": [{"name", "calls", "total_us"}], ...}``;
memory copies and sets are listed there too, under their ``Memcpy`` / ``Memset`` names). On the
CPU the list is empty: there are no device events.
Prints one JSON line:
  {"suite":"pretrain","impl":"pytorch","preset","batch","dtype":"f32","device":"cpu","threads",
   "images_per_s","ms_per_step_median", ...,"peak_mem_mb"}
peak_mem_mb is this process's peak RSS (resource.getrusage ru_maxrss) on the CPU, and
torch.cuda.max_memory_allocated() on CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convmae_torch import PRESETS, from_config, param_groups_for_adamw  # noqa: E402
from convvit_torch import ConvViT, finetune_param_groups, soft_target_cross_entropy  # noqa: E402

# The fine-tuning step's classes and label smoothing (ImageNet-1k, the official recipe).
NUM_CLASSES = 1000
SMOOTHING = 0.1
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def device_time_us(avg) -> tuple[float, str]:
    """A key_averages() entry's device time in us, and which attribute held it: torch 2.4 renamed
    cuda_time_total to device_time_total (the old name warns, later ones may drop it). For a kernel
    entry the self and total times are the same (a kernel has no children)."""
    for attr in ("self_device_time_total", "device_time_total", "self_cuda_time_total", "cuda_time_total"):
        value = getattr(avg, attr, None)
        if value is not None:
            return float(value), attr
    return float("nan"), "none"


def profile_step(step, cuda: bool) -> dict:
    """Runs `step` once under torch.profiler; returns its CUDA kernels' totals by name."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step_s = step()
        if cuda:
            torch.cuda.synchronize()
    kernels = []
    attr = None
    for avg in prof.key_averages():
        # Device-side entries (kernels, copies, sets) have device_type CUDA; the CPU ops that
        # launched them would count the same time again.
        if not str(getattr(avg, "device_type", "")).endswith("CUDA"):
            continue
        total_us, attr = device_time_us(avg)
        kernels.append({"name": avg.key, "calls": int(avg.count), "total_us": total_us})
    kernels.sort(key=lambda k: -k["total_us"])
    return {"kernels": kernels, "time_attr": attr, "step_ms": step_s * 1000.0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="pretrain", choices=["pretrain", "finetune"])
    ap.add_argument("--preset", default="convmae-base", choices=sorted(PRESETS))
    ap.add_argument("--config", default=None, help="JSON overrides applied on top of the preset")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=None, help="default 1.5e-4 (pretrain), 2e-3 (finetune: blr 5e-4 x 1024 / 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="one more step under torch.profiler: CUDA kernel times in the JSON line")
    args = ap.parse_args()
    if args.amp != "none" and args.device != "cuda":
        ap.error("--amp bf16 is measured on CUDA only")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("batch, steps and threads must be >= 1, warmup >= 0")

    import_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # after `import torch`
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)

    cfg = dict(PRESETS[args.preset])
    if args.config:
        cfg.update(json.loads(args.config))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    finetune = args.task == "finetune"
    if finetune:
        model = ConvViT(img_size=cfg["img_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                        mlp_ratio=cfg.get("mlp_ratio", (4, 4, 4)), num_classes=NUM_CLASSES, drop_path=0.1).to(device)
        lr = args.lr if args.lr is not None else 2e-3
        groups = finetune_param_groups(model, 0.05, 0.65)
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    else:
        model = from_config(cfg).to(torch.float32).to(device)
        opt = torch.optim.AdamW(param_groups_for_adamw(model, 0.05), lr=args.lr if args.lr is not None else 1.5e-4, betas=(0.9, 0.95))
    model.train()
    forward = torch.compile(model) if args.compile else model

    b, s = args.batch, model.img_size
    mean = torch.tensor(MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    targets = torch.empty(0)

    def step() -> float:
        nonlocal targets
        u8 = torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=gen)  # like the uint8 batches ours gets
        if finetune:
            labels = torch.randint(0, NUM_CLASSES, (b,), generator=gen)
            targets = torch.full((b, NUM_CLASSES), SMOOTHING / NUM_CLASSES).scatter_(1, labels[:, None], 1.0 - SMOOTHING + SMOOTHING / NUM_CLASSES)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # The host-to-device copy of the uint8 batch is part of the step, as it is for ours.
        imgs = (u8.to(device).permute(0, 3, 1, 2).to(torch.float32) / 255.0 - mean) / std
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            if finetune:
                loss = soft_target_cross_entropy(forward(imgs), targets.to(device))
            else:
                loss, _, _ = forward(imgs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        v = loss.item()  # synchronizes
        dt = time.perf_counter() - t0
        if v != v:
            raise RuntimeError("loss is NaN")
        return dt

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    med = statistics.median(times)
    profile = profile_step(step, cuda) if args.profile else None
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    impl = "pytorch" + ("-compile" if args.compile else "")
    out = {
        "suite": args.task,
        "impl": impl,
        "preset": args.preset,
        "batch": b,
        "dtype": "bf16" if args.amp == "bf16" else "f32",
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": args.threads,
        "images_per_s": b / med,
        "ms_per_step_median": med * 1000.0,
        "ms_per_step": [t * 1000.0 for t in times],
        "warmup": args.warmup,
        "steps": args.steps,
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_kb / 1024.0,
        "host_rss_mb": peak_kb / 1024.0,
        "import_rss_mb": import_rss_mb,
        "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if profile is not None:
        out["profile"] = profile
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
