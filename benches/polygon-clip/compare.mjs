// Our crop of polygons (movePolygons: Sutherland-Hodgman, spikes removed) and rasterization
// against the reference cases reference.py writes: how many masks and boxes differ, among the
// cases whose polygons are all valid (simple) and among the others (self-intersecting, which
// detectron2 first repairs by shapely's buffer(0)).
// Usage: node benches/polygon-clip/compare.mjs OUT.json (after npm run build).
import { readFileSync } from 'node:fs';
import { movePolygons } from '../../dist/src/data/detection-transforms.js';
import { rasterizePolygons } from '../../dist/src/data/detection.js';

const cases = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const tally = () => ({ cases: 0, casesDiffering: 0, masksDiffering: 0, pixelsDiffering: 0, boxesDiffering: 0 });
const by = { valid: tally(), selfIntersecting: tally() };
for (const c of cases) {
  const t = c.valid ? by.valid : by.selfIntersecting;
  t.cases++;
  const moved = movePolygons(c.polys, { scaleX: 1, scaleY: 1, left: c.x0, top: c.y0, cropWidth: c.cw, cropHeight: c.ch, flipWidth: undefined });
  const differ = rasterizePolygons(moved, c.ch, c.cw).reduce((n, v, i) => n + (v !== c.mask[i] ? 1 : 0), 0);
  if (differ) t.masksDiffering++;
  t.pixelsDiffering += differ;
  const xs = moved.flatMap((p) => p.filter((_, i) => i % 2 === 0));
  const ys = moved.flatMap((p) => p.filter((_, i) => i % 2 === 1));
  const box = xs.length ? [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)] : null;
  const same = box === null ? c.box === null : c.box !== null && box.every((v, i) => Math.abs(v - c.box[i]) < 1e-9);
  if (!same) t.boxesDiffering++;
  if (differ || !same) t.casesDiffering++;
}
console.log(JSON.stringify(by));
