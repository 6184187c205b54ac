/**
 * One measurement of our pretraining data pipeline, in a process of its own
 * (the data suite pins it to the measured cores with taskset):
 *
 *   node dist/benches/data-worker.js --folder DIR --workers 2 --batch 32 --size 224 --images 1024 [--decoder native|sharp]
 *
 * BatchLoader over the folder with the pretraining transform
 * (RandomResizedCrop 224, scale 0.2-1, bicubic; flip p=0.5; uint8 HWC out),
 * `workers` decode threads (native) or images in flight (sharp). The first
 * `--warmup` batches (at least 1) are untimed; then the clock runs until `--images` more
 * images have been delivered. Prints one JSON line.
 */
import { BatchLoader, openImageFolder } from '../src/data/index.js';
import { intFlag, parseArgs } from './lib.js';

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2));
  const folder = opts.flags.folder;
  if (!folder) throw new Error('--folder is required');
  const workers = intFlag(opts, 'workers', 1);
  const batchSize = intFlag(opts, 'batch', 32);
  const imageSize = intFlag(opts, 'size', 224);
  const images = intFlag(opts, 'images', 1024);
  const warmup = intFlag(opts, 'warmup', 2, 1);
  const decoder = opts.flags.decoder ?? 'native';
  if (decoder !== 'native' && decoder !== 'sharp') throw new Error(`--decoder must be native or sharp, got ${decoder}`);

  const dataset = await openImageFolder(folder);
  const steps = warmup + Math.ceil(images / batchSize);
  const loader = new BatchLoader({
    dataset,
    batchSize,
    imageSize,
    seed: 0,
    endStep: steps,
    nativeJpeg: decoder === 'native',
    decodeThreads: workers,
    concurrency: decoder === 'native' ? Math.max(2, workers) : workers,
  });
  let delivered = 0;
  let started = 0;
  let checksum = 0;
  for await (const batch of loader) {
    checksum = (checksum + batch.images[batch.images.length >> 1]) % 65536; // touch the data
    // The clock starts when the last warmup batch arrives.
    if (batch.step === warmup - 1) started = performance.now();
    else if (batch.step >= warmup) delivered += batch.batchSize;
  }
  const seconds = (performance.now() - started) / 1000;
  if (loader.skipped.length > 0) throw new Error(`${loader.skipped.length} images could not be read, first ${loader.skipped[0].path}`);
  process.stdout.write(
    JSON.stringify({ impl: decoder === 'native' ? 'ours' : 'ours-sharp', workers, images: delivered, seconds, images_per_s: delivered / seconds, checksum }) + '\n',
  );
}

main().catch((e: unknown) => {
  process.stderr.write(`data-worker: ${e instanceof Error ? e.stack ?? e.message : String(e)}\n`);
  process.exit(1);
});
