"""OpenCV as the reference for the segmentation pipeline's resizes (test/oracles.test.ts); mmcv's
imresize, which the official SEG pipeline uses, is cv2.resize.

Reads one JSON request on stdin, writes one JSON answer on stdout:
  {"command": "resize", "cases": [{"height", "width", "outHeight", "outWidth",
   "rgb": [h * w * 3 bytes], "labels": [h * w bytes]}]}
    -> {"rgb": [[...]], "labels": [[...]]}: cv2.resize INTER_LINEAR of the RGB image and
       INTER_NEAREST of the label map, row-major.
  {"command": "convert", "cases": [{"alpha", "beta", "pixels": [bytes]}]}
    -> {"pixels": [[...]]}: mmseg PhotoMetricDistortion's convert, numpy's
       clip(img.astype(float32) * alpha + beta, 0, 255).astype(uint8).
"""
import json
import sys

import cv2
import numpy as np


def resize(request):
    rgb, labels = [], []
    for case in request["cases"]:
        size = (case["outWidth"], case["outHeight"])
        image = np.array(case["rgb"], dtype=np.uint8).reshape(case["height"], case["width"], 3)
        label_map = np.array(case["labels"], dtype=np.uint8).reshape(case["height"], case["width"])
        rgb.append(cv2.resize(image, size, interpolation=cv2.INTER_LINEAR).reshape(-1).tolist())
        labels.append(cv2.resize(label_map, size, interpolation=cv2.INTER_NEAREST).reshape(-1).tolist())
    return {"rgb": rgb, "labels": labels}


def convert(request):
    out = []
    for case in request["cases"]:
        img = np.array(case["pixels"], dtype=np.uint8)
        img = img.astype(np.float32) * case["alpha"] + case["beta"]
        out.append(np.clip(img, 0, 255).astype(np.uint8).tolist())
    return {"pixels": out}


def main():
    request = json.load(sys.stdin)
    json.dump({"resize": resize, "convert": convert}[request["command"]](request), sys.stdout)


if __name__ == "__main__":
    main()
