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
  {"command": "hsv", "cases": [{"height", "width", "rgb": [bytes], "saturation": alpha | null,
   "hue": delta | null}]}
    -> {"rgb": [[...]]}: mmseg 0.11 PhotoMetricDistortion's saturation step (alpha given) or
       hue step (delta given) on the image as mmseg holds it (BGR): mmcv.bgr2hsv
       (cv2.cvtColor BGR2HSV), S = convert(S, alpha) or H = (H + delta) % 180, mmcv.hsv2bgr;
       returned as RGB.
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


def hsv(request):
    out = []
    for case in request["cases"]:
        bgr = np.array(case["rgb"], dtype=np.uint8).reshape(case["height"], case["width"], 3)[:, :, ::-1].copy()
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        if case["saturation"] is not None:
            img[:, :, 1] = np.clip(img[:, :, 1].astype(np.float32) * case["saturation"], 0, 255).astype(np.uint8)
        if case["hue"] is not None:
            img[:, :, 0] = (img[:, :, 0].astype(int) + case["hue"]) % 180
        out.append(cv2.cvtColor(img, cv2.COLOR_HSV2BGR)[:, :, ::-1].reshape(-1).tolist())
    return {"rgb": out}


def main():
    request = json.load(sys.stdin)
    json.dump({"resize": resize, "convert": convert, "hsv": hsv}[request["command"]](request), sys.stdout)


if __name__ == "__main__":
    main()
