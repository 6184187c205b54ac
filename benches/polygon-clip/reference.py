"""detectron2's crop of PolygonMasks (CropTransform.apply_polygons: shapely buffer(0), intersection
with the crop box, each part's exterior) then pycocotools' rasterization of the parts, on random
star-shaped polygons (angles sorted around a centre: some self-intersect, as some COCO polygons do), for
compare.mjs to hold our clip against; each case says whether all its polygons are valid (simple).

Usage: python3 reference.py SEED OUT.json, with shapely, numpy and pycocotools importable
(e.g. PYTHONPATH=.cache/test-oracles plus `pip install --target DIR shapely==2.2.0`).
"""
import json, sys, numpy as np
import shapely.geometry as geometry
from pycocotools import mask as mu
rng = np.random.default_rng(int(sys.argv[1]))
cases = []
for i in range(500):
    W = int(rng.integers(10, 60)); H = int(rng.integers(10, 60))
    polys = []
    for _ in range(int(rng.integers(1, 3))):
        k = int(rng.integers(3, 9))
        cx, cy = rng.uniform(-10, W + 10), rng.uniform(-10, H + 10)
        # star-ish polygons (concave, non-self-intersecting): sorted angles, random radii
        ang = np.sort(rng.uniform(0, 2 * np.pi, k)); rad = rng.uniform(2, 25, k)
        p = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], -1).reshape(-1)
        polys.append(p.tolist())
    x0, y0 = int(rng.integers(0, 10)), int(rng.integers(0, 10)); cw, ch = int(rng.integers(5, W)), int(rng.integers(5, H))
    crop_box = geometry.box(x0, y0, x0 + cw, y0 + ch).buffer(0.0)
    out = []
    for p in polys:
        poly = geometry.Polygon(np.asarray(p).reshape(-1, 2)).buffer(0.0)
        if not poly.is_valid: continue
        c = poly.intersection(crop_box)
        if c.is_empty: continue
        parts = c.geoms if hasattr(c, 'geoms') else [c]
        for q in parts:
            if not isinstance(q, geometry.Polygon) or not q.is_valid: continue
            coords = np.asarray(q.exterior.coords)[:-1]
            coords = coords - [x0, y0]
            out.append(coords.reshape(-1).tolist())
    if out:
        m = mu.decode(mu.merge(mu.frPyObjects(out, ch, cw)))
        allc = np.concatenate([np.asarray(o).reshape(-1, 2) for o in out])
        box = [allc[:, 0].min(), allc[:, 1].min(), allc[:, 0].max(), allc[:, 1].max()]
    else:
        m = np.zeros((ch, cw), np.uint8); box = None
    # Whether every polygon is simple: detectron2 repairs the others by buffer(0) before it crops.
    valid = all(geometry.Polygon(np.asarray(p).reshape(-1, 2)).is_valid for p in polys)
    cases.append(dict(polys=polys, x0=x0, y0=y0, cw=cw, ch=ch, mask=m.reshape(-1).tolist(), box=box, valid=valid))
json.dump(cases, open(sys.argv[2], 'w'))
