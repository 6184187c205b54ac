"""The torchvision baseline of the data benchmark (benches/data.ts).

PyTorch DataLoader with `--workers` worker processes over the same folder of
JPEGs, each sample: PIL open + convert('RGB') (torchvision's default loader),
RandomResizedCrop(224, scale=(0.2, 1.0), bicubic), RandomHorizontalFlip(),
PILToTensor (uint8 CHW). That is the transform of our loader, which also
stops at uint8 and leaves normalization to the training step (the official
MAE recipe's ToTensor + Normalize in the workers would only add to
torchvision's time). Batches of `--batch`, shuffled, infinite over epochs.
The first `--warmup` batches are untimed (they include starting the worker
processes); then the clock runs until `--images` more images arrived.
Prints one JSON line.
"""
import argparse
import json
import os
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T


class Folder(Dataset):
    def __init__(self, root, transform):
        self.files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith((".jpg", ".jpeg")))
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with open(self.files[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--folder", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    transform = T.Compose(
        [
            T.RandomResizedCrop(a.size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ]
    )
    ds = Folder(a.folder, transform)
    loader = DataLoader(
        ds,
        batch_size=a.batch,
        shuffle=True,
        num_workers=a.workers,
        drop_last=True,
        persistent_workers=a.workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    steps = a.warmup + -(-a.images // a.batch)
    step = 0
    delivered = 0
    started = 0.0
    checksum = 0
    while step < steps:
        for batch in loader:
            checksum = (checksum + int(batch.view(-1)[batch.numel() // 2])) % 65536
            if step == a.warmup - 1:
                started = time.perf_counter()
            elif step >= a.warmup:
                delivered += batch.shape[0]
            step += 1
            if step >= steps:
                break
    seconds = time.perf_counter() - started
    import PIL
    import torchvision

    print(
        json.dumps(
            {
                "impl": "torchvision",
                "workers": a.workers,
                "images": delivered,
                "seconds": seconds,
                "images_per_s": delivered / seconds,
                "checksum": checksum,
                "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__},
            }
        )
    )


if __name__ == "__main__":
    main()
