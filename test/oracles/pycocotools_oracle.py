"""pycocotools as the reference for our COCO code (test/pycocotools.test.ts).

Reads one JSON request on stdin, writes one JSON answer on stdout:
  {"command": "rasterize", "cases": [{"height", "width", "polygons": [[x1, y1, ...], ...]}]}
    -> {"masks": ["0110...", ...]}: each case's frPyObjects + merge + decode, row-major.
  {"command": "evaluate", "scenes": [{"iouType": "bbox" | "segm", "images": [{"id", "width",
   "height"}], "categories": [id, ...], "gts": [{"id", "image_id", "category_id",
   "bbox": [x, y, w, h], "area", "iscrowd", "mask": "0110..."}], "dts": [{"image_id",
   "category_id", "score", "bbox": [x, y, w, h], "mask": "0110..."}]}]}
    -> {"stats": [[12 numbers], ...]}: COCOeval's evaluate, accumulate, summarize per scene.
Masks travel as row-major strings of 0 and 1 (height * width characters).
"""
import contextlib
import json
import sys

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def mask_from_bits(bits, height, width):
    flat = np.frombuffer(bits.encode("ascii"), dtype=np.uint8) - ord("0")
    return np.asfortranarray(flat.reshape(height, width))


def compressed_rle(bits, height, width):
    rle = mask_util.encode(mask_from_bits(bits, height, width))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def rasterize(request):
    masks = []
    for case in request["cases"]:
        rles = mask_util.frPyObjects(case["polygons"], case["height"], case["width"])
        mask = mask_util.decode(mask_util.merge(rles))
        masks.append("".join("1" if v else "0" for v in mask.reshape(-1)))
    return {"masks": masks}


def evaluate(request):
    return {"stats": [evaluate_scene(scene) for scene in request["scenes"]]}


def evaluate_scene(request):
    iou_type = request["iouType"]
    sizes = {im["id"]: (im["height"], im["width"]) for im in request["images"]}
    gts = []
    for g in request["gts"]:
        ann = {k: g[k] for k in ("id", "image_id", "category_id", "bbox", "area", "iscrowd")}
        if iou_type == "segm":
            ann["segmentation"] = compressed_rle(g["mask"], *sizes[g["image_id"]])
        gts.append(ann)
    dataset = {
        "images": request["images"],
        "categories": [{"id": c, "name": str(c)} for c in request["categories"]],
        "annotations": gts,
    }
    results = []
    for d in request["dts"]:
        r = {"image_id": d["image_id"], "category_id": d["category_id"], "score": d["score"]}
        if iou_type == "segm":
            r["segmentation"] = compressed_rle(d["mask"], *sizes[d["image_id"]])
        else:
            r["bbox"] = d["bbox"]
        results.append(r)
    # COCO and COCOeval print progress; stdout carries the answer.
    with contextlib.redirect_stdout(sys.stderr):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else COCO()
        if not results:
            coco_dt.dataset = {"images": request["images"], "categories": dataset["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def main():
    request = json.load(sys.stdin)
    handlers = {"rasterize": rasterize, "evaluate": evaluate}
    json.dump(handlers[request["command"]](request), sys.stdout)


if __name__ == "__main__":
    main()
