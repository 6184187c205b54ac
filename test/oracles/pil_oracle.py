"""Pillow as the reference for detectron2's mask resizing (test/oracles.test.ts): detectron2
resizes BitMasks with PIL's Image.resize(NEAREST).

Reads one JSON request on stdin, writes one JSON answer on stdout:
  {"command": "nearest", "cases": [{"height", "width", "outHeight", "outWidth",
   "mask": [h * w bytes]}]}
    -> {"masks": [[...]]}: each mask through Image.fromarray(...).resize(NEAREST), row-major.
  {"command": "resize", "filter": "bilinear" | "bicubic", "cases": [{"height", "width",
   "outHeight", "outWidth", "rgb": [h * w * 3 bytes]}]}
    -> {"rgb": [[...]]}: each RGB image through Image.resize(BILINEAR or BICUBIC): detectron2's
       ResizeTransform on uint8 images, torchvision's RandomResizedCrop (bicubic).
"""
import json
import sys

import numpy as np
from PIL import Image


def nearest(request):
    masks = []
    for case in request["cases"]:
        mask = np.array(case["mask"], dtype=np.uint8).reshape(case["height"], case["width"])
        out = Image.fromarray(mask).resize((case["outWidth"], case["outHeight"]), Image.NEAREST)
        masks.append(np.asarray(out).reshape(-1).tolist())
    return {"masks": masks}


def resize(request):
    images = []
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[request["filter"]]
    for case in request["cases"]:
        rgb = np.array(case["rgb"], dtype=np.uint8).reshape(case["height"], case["width"], 3)
        out = Image.fromarray(rgb).resize((case["outWidth"], case["outHeight"]), resample)
        images.append(np.asarray(out).reshape(-1).tolist())
    return {"rgb": images}


def main():
    request = json.load(sys.stdin)
    json.dump({"nearest": nearest, "resize": resize}[request["command"]](request), sys.stdout)


if __name__ == "__main__":
    main()
