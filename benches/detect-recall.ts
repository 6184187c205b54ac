/**
 * Where a detector checkpoint goes wrong on the digit scenes: of the first N scenes' objects
 * (through the train transform at scale 1, in the layout the model trained on: DET's padded
 * canvas or vitdet's ImageList with extents), the share found among its 10 best detections
 * with IoU > 0.5, of the right class and of any class. Localization without classification shows
 * as a high second number and a low first one; the same numbers on the train and the test split
 * say the evaluation path is not what differs.
 *
 *   node dist/benches/detect-recall.js CHECKPOINT [train|t10k] [N]
 */
import { Detector, createRng, detectionTrainTransform, openDigitDetectionScenes, type BoxXyxy, type DetectorOptions } from '../src/index.js';
import { native } from '../src/native.js';

function iou(a: BoxXyxy, b: BoxXyxy): number {
  const w = Math.max(0, Math.min(a[2], b[2]) - Math.max(a[0], b[0]));
  const h = Math.max(0, Math.min(a[3], b[3]) - Math.max(a[1], b[1]));
  const inter = w * h;
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter);
}

async function main(): Promise<void> {
  const [checkpoint, split = 't10k', count = '100'] = process.argv.slice(2);
  if (!checkpoint || (split !== 'train' && split !== 't10k')) throw new Error('usage: detect-recall.js CHECKPOINT [train|t10k] [N]');
  const meta = JSON.parse(await native.checkpointMetadata(checkpoint)) as Record<string, string>;
  if (meta.kind !== 'detector') throw new Error(`'${checkpoint}' is not one of our detector checkpoints`);
  const head = JSON.parse(meta.head!) as Record<string, unknown>;
  const camel = (key: string) => key.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
  const options = Object.fromEntries(Object.entries(head).map(([k, v]) => [camel(k), v])) as unknown as DetectorOptions;
  const model = Detector.create({ ...options, config: JSON.parse(meta.config!) as DetectorOptions['config'] });
  try {
    await model.load(checkpoint);
    const size = model.config.img_size;
    const n = Number(count);
    const scenes = await openDigitDetectionScenes(split, { limit: n, size: 64 });
    let [sameClass, anyClass, objects] = [0, 0, 0];
    for (let i = 0; i < scenes.length; i++) {
      const input = detectionTrainTransform(await scenes.sample(i), size, createRng(i), { scaleRange: [1, 1], imageList: model.variant === 'vitdet' });
      const [found] = await model.detect({ images: input.image, batchSize: 1, height: size, width: size }, input.extent ? { extents: [input.extent] } : {});
      const best = found!.boxes.slice(0, 10).map((box, k) => ({ box, category: found!.classes[k]! }));
      for (const object of input.instances) {
        objects++;
        if (best.some((d) => d.category === object.category && iou(d.box, object.box) > 0.5)) sameClass++;
        if (best.some((d) => iou(d.box, object.box) > 0.5)) anyClass++;
      }
    }
    process.stdout.write(JSON.stringify({ checkpoint, split, scenes: scenes.length, objects, recall_same_class: sameClass / objects, recall_any_class: anyClass / objects }) + '\n');
  } finally {
    model.dispose();
  }
}

await main();
