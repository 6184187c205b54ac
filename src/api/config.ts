/**
 * The model configuration. Keys mirror the keyword arguments of the official
 * `MaskedAutoencoderConvViT` (snake_case on purpose, so a config reads like the Python factory call).
 */
import { native } from '../native.js';

export interface ConvMaeConfig {
  /** Input side in pixels, any multiple of 16 (the official code hard-codes 224). */
  img_size: number;
  in_chans: number;
  /** Strides of the three patch embeds; product 16. */
  patch_size: [number, number, number];
  embed_dim: [number, number, number];
  depth: [number, number, number];
  /** Heads of the stage-3 transformer blocks. */
  num_heads: number;
  mlp_ratio: [number, number, number];
  qkv_bias: boolean;
  decoder_embed_dim: number;
  decoder_depth: number;
  decoder_num_heads: number;
  norm_pix_loss: boolean;
  mask_ratio: number;
  /**
   * FastConvMAE's complementary masking: each image is seen as `L / len_keep` views (4 at mask
   * ratio 0.75) whose visible tokens split its tokens, so the loss covers every token of every
   * image. The weights are the same model's either way. Default false (ConvMAE's one mask).
   */
  complementary_masking: boolean;
}

/** `convmae-base` is the paper's ConvMAE-B; `convmae-tiny` (64 px) is the CPU demo and test model. */
export type PresetName = 'convmae-base' | 'convmae-small' | 'convmae-tiny' | 'convmae-golden-small';
export const PRESETS: readonly PresetName[] = ['convmae-base', 'convmae-small', 'convmae-tiny', 'convmae-golden-small'];

export interface ModelSpec {
  /** Named preset; default `convmae-base`. */
  preset?: PresetName | string;
  /** Overrides applied on top of the preset. */
  config?: Partial<ConvMaeConfig>;
}

/** Resolves a preset plus overrides into a complete, validated config (throws before any compute). */
export function resolveConfig(spec: ModelSpec = {}): ConvMaeConfig {
  const base = JSON.parse(native.presetConfig(spec.preset ?? 'convmae-base')) as ConvMaeConfig;
  return JSON.parse(native.resolveConfig(JSON.stringify({ ...base, ...(spec.config ?? {}) }))) as ConvMaeConfig;
}

export interface TensorInfo {
  name: string;
  shape: number[];
  trainable: boolean;
}

export interface ModelInfo {
  config: ConvMaeConfig;
  tensors: TensorInfo[];
  count: number;
  elements: number;
  trainableElements: number;
  /** Encoder with pos_embed and norm, without the fusion convs (what downstream tasks keep). */
  encoderElements: number;
  fusionElements: number;
  decoderElements: number;
  /** Multiply-accumulates per image (spec section 3 scope). */
  macs: { pretrain_dense: number; pretrain_sparse: number; encoder: number };
}

/**
 * The model configuration of a checkpoint file: from our metadata (`source: 'metadata'`), else
 * as its encoder tensors' shapes give it (`'shapes'`: widths, patch sizes, depths, MLP ratios and
 * the image size of its pos_embed grid; `num_heads` is in no shape, so it is a guess of one head
 * per 64 channels, and the decoder is ConvMAE-B's). Undefined when the file holds neither.
 */
export async function checkpointConfig(path: string): Promise<{ config: ConvMaeConfig; source: 'metadata' | 'shapes' } | undefined> {
  const r = await native.checkpointConfig(path);
  return r === null || r === undefined ? undefined : (JSON.parse(r) as { config: ConvMaeConfig; source: 'metadata' | 'shapes' });
}

export function modelInfo(spec: ModelSpec = {}): ModelInfo {
  return JSON.parse(native.modelInfo(JSON.stringify(resolveConfig(spec)))) as ModelInfo;
}
