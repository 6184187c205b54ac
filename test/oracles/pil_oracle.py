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
  {"command": "randaugment", "fill": [r, g, b], "cases": [{"op", "level", "sign", "size",
   "rgb": [size * size * 3 bytes]}]}
    -> {"rgb": [[...]]}: each image through one of timm's RandAugment ops (the official fine-tune
       recipe's rand-m9-mstd0.5-inc1: the "increasing" ops, BICUBIC, filled with `fill`), at
       magnitude `level` with `sign` (+1 or -1) where the op negates its argument at random.
"""
import json
import sys

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


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


def randaugment_op(img, op, level, sign, fill):
    """timm's op and its level-to-argument mapping (level on the 0..10 scale)."""
    geometry = dict(resample=Image.BICUBIC, fillcolor=fill)
    fraction = level / 10.0
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Invert":
        return ImageOps.invert(img)
    if op == "Rotate":
        return img.rotate(sign * fraction * 30.0, **geometry)
    if op == "PosterizeIncreasing":
        bits = 4 - int(fraction * 4)
        return img if bits >= 8 else ImageOps.posterize(img, bits)
    if op == "SolarizeIncreasing":
        return ImageOps.solarize(img, 256 - int(fraction * 256))
    if op == "SolarizeAdd":
        add = int(fraction * 110)
        return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
    enhancers = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
                 "BrightnessIncreasing": ImageEnhance.Brightness, "SharpnessIncreasing": ImageEnhance.Sharpness}
    if op in enhancers:
        return enhancers[op](img).enhance(1.0 + sign * fraction * 0.9)
    size = img.size[0]
    affine = {"ShearX": (1, sign * fraction * 0.3, 0, 0, 1, 0), "ShearY": (1, 0, 0, sign * fraction * 0.3, 1, 0),
              "TranslateXRel": (1, 0, sign * fraction * 0.45 * size, 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, sign * fraction * 0.45 * size)}[op]
    return img.transform(img.size, Image.AFFINE, affine, **geometry)


def randaugment(request):
    fill = tuple(request["fill"])
    images = []
    for case in request["cases"]:
        size = case["size"]
        img = Image.fromarray(np.array(case["rgb"], dtype=np.uint8).reshape(size, size, 3))
        out = randaugment_op(img, case["op"], case["level"], case["sign"], fill)
        images.append(np.asarray(out).reshape(-1).tolist())
    return {"rgb": images}


def main():
    request = json.load(sys.stdin)
    json.dump({"nearest": nearest, "resize": resize, "randaugment": randaugment}[request["command"]](request), sys.stdout)


if __name__ == "__main__":
    main()
