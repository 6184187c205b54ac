/**
 * The data benchmark's image folder: about 400 JPEGs of ImageNet-like size
 * (500x375 landscape or 375x500 portrait, quality 90, 4:2:0 chroma as most
 * ImageNet files) cut from the real photographs that scikit-image ships in
 * its wheel (astronaut, coffee, chelsea, rocket, motorcycles, ...).
 *
 * Built on demand under .cache/bench-data/ (git-ignored): the wheel is
 * fetched once with `pip download` from PyPI, the photos are extracted with
 * Python's zipfile, and every JPEG is a seeded random crop (50-100% of the
 * photo's area) of one photo, resized and sometimes mirrored, so the folder
 * is the same on every machine.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import sharp from 'sharp';
import { createRng } from '../src/data/rng.js';
import { REPO_ROOT } from './lib.js';

const SKIMAGE_VERSION = '0.26.0';

/** Colour photographs of the wheel's skimage/data (not the synthetic or greyscale test images). */
const PHOTOS = [
  'astronaut.png',
  'chelsea.png',
  'coffee.png',
  'motorcycle_left.png',
  'motorcycle_right.png',
  'rocket.jpg',
  'hubble_deep_field.jpg',
  'retina.jpg',
  'ihc.png',
];

function python(): string {
  return process.env.CONVMAE_BENCH_PYTHON || 'python3';
}

/** The photographs, extracted from the scikit-image wheel (downloaded once). */
function extractPhotos(cache: string, log: (line: string) => void): string {
  const photoDir = path.join(cache, `skimage-${SKIMAGE_VERSION}-photos`);
  if (PHOTOS.every((p) => existsSync(path.join(photoDir, p)))) return photoDir;
  const wheelDir = path.join(cache, 'wheels');
  mkdirSync(wheelDir, { recursive: true });
  const findWheel = () => readdirSync(wheelDir).find((f) => f.startsWith(`scikit_image-${SKIMAGE_VERSION}-`) && f.endsWith('.whl'));
  if (!findWheel()) {
    log(`data: downloading the scikit-image ${SKIMAGE_VERSION} wheel from PyPI for its sample photographs ...`);
    try {
      execFileSync(python(), ['-m', 'pip', 'download', `scikit-image==${SKIMAGE_VERSION}`, '--no-deps', '--only-binary=:all:', '-d', wheelDir], {
        stdio: ['ignore', 'ignore', 'inherit'],
      });
    } catch (err) {
      throw new Error(
        `cannot download the scikit-image wheel with ${python()} -m pip (${(err as Error).message.split('\n')[0]}); ` +
          'set CONVMAE_BENCH_PYTHON to a Python with pip and PyPI access, or pass --folder DIR of JPEGs',
      );
    }
  }
  const wheel = findWheel();
  if (!wheel) throw new Error(`pip download left no scikit-image ${SKIMAGE_VERSION} wheel in ${wheelDir}`);
  mkdirSync(photoDir, { recursive: true });
  const script = [
    'import sys, zipfile',
    'z = zipfile.ZipFile(sys.argv[1])',
    'for name in sys.argv[3:]:',
    '    open(sys.argv[2] + "/" + name, "wb").write(z.read("skimage/data/" + name))',
  ].join('\n');
  execFileSync(python(), ['-c', script, path.join(wheelDir, wheel), photoDir, ...PHOTOS]);
  return photoDir;
}

/**
 * The folder of `count` benchmark JPEGs (built when missing). Returns its
 * path; the files are named 0000.jpg, 0001.jpg, ...
 */
export async function benchPhotoFolder(count: number, log: (line: string) => void): Promise<string> {
  const cache = path.join(REPO_ROOT, '.cache', 'bench-data');
  const folder = path.join(cache, `photos-${count}`);
  const done = path.join(folder, '.complete');
  if (existsSync(done)) return folder;
  const photoDir = extractPhotos(cache, log);
  log(`data: writing ${count} JPEGs to ${path.relative(process.cwd(), folder)} ...`);
  mkdirSync(folder, { recursive: true });
  const sources = await Promise.all(
    PHOTOS.map(async (p) => {
      const { data, info } = await sharp(path.join(photoDir, p)).removeAlpha().toColourspace('srgb').raw().toBuffer({ resolveWithObject: true });
      return { data, width: info.width, height: info.height, channels: info.channels };
    }),
  );
  const rng = createRng(20261126);
  for (let i = 0; i < count; i++) {
    const src = sources[i % sources.length];
    const portrait = rng() < 0.25;
    const [outW, outH] = portrait ? [375, 500] : [500, 375];
    // A crop of 50-100% of the photo's area at the output's aspect ratio.
    const aspect = outW / outH;
    const area = src.width * src.height * (0.5 + 0.5 * rng());
    const w = Math.min(src.width, Math.round(Math.sqrt(area * aspect)));
    const h = Math.min(src.height, Math.round(w / aspect));
    const left = Math.floor(rng() * (src.width - w + 1));
    const top = Math.floor(rng() * (src.height - h + 1));
    let image = sharp(src.data, { raw: { width: src.width, height: src.height, channels: src.channels as 3 } })
      .extract({ left, top, width: w, height: h })
      .resize(outW, outH, { fit: 'fill', kernel: 'lanczos3' });
    if (rng() < 0.5) image = image.flop();
    const jpeg = await image.jpeg({ quality: 90, chromaSubsampling: '4:2:0' }).toBuffer();
    writeFileSync(path.join(folder, `${String(i).padStart(4, '0')}.jpg`), jpeg);
  }
  writeFileSync(done, `${count} JPEGs from scikit-image ${SKIMAGE_VERSION} photos\n`);
  return folder;
}
