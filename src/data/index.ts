/** Data pipeline of ConvMAE pretraining: datasets, transforms, batch loader. */
export { beta, createRng, deriveSeed, gamma, normal, permutation, randInt, uniform, type Rng } from './rng.js';
export {
  applyPretrainParams,
  readSourceBytes,
  DEFAULT_HFLIP_PROB,
  DEFAULT_RATIO,
  DEFAULT_SCALE,
  evalGeometry,
  evalTransform,
  openImage,
  pretrainTransform,
  roundHalfEven,
  samplePretrainParams,
  sampleRandomResizedCrop,
  sharpJpegShrinkOnLoad,
  shrinkOnLoadPlan,
  type CropBox,
  type OpenedImage,
  type PretrainParams,
  type PretrainResult,
  type PretrainTransformOptions,
  type ShrinkOnLoadPlan,
} from './transforms.js';
export {
  IMAGE_EXTENSIONS,
  mnistDataDir,
  openDataset,
  openFileList,
  openIdx,
  openImageFolder,
  openMnist,
  type FileListDataset,
  type IdxDataset,
  type ImageDataset,
  type ImageFolderDataset,
  type ImageSource,
  type OpenIdxOptions,
} from './datasets.js';
export { classBalancedSubset } from './subset.js';
export { decodeBmp, isBmp, type DecodedBmp } from './bmp.js';
export { BatchLoader, unseenImages, type Batch, type BatchLoaderOptions, type SkippedSample } from './loader.js';
export { mixedTargets, sampleMix, type MixDraw, type MixSpec, type MixupOptions } from './mixup.js';
export { sampleErasing, type EraseBox, type ErasingOptions } from './erasing.js';
export { RAND_AUGMENT_OPS, randAugment, type RandAugmentOptions } from './randaugment.js';
export { DEFAULT_SHUFFLE_BUFFER, expandShardPattern, listShardFiles, openTarShards, type OpenTarShardsOptions, type ShardDataset } from './shards.js';
export { listTar, readRange, type ListTarOptions, type TarMember } from './tar.js';
export { isJpeg, readJpegHeader, type JpegHeader } from './jpeg.js';
export { cropPixelBatch, decodeCropBatch, nativeDecoder, nativePixelCropper, type NativeCropJob, type NativeCropResult, type NativePixelJob } from './native-decode.js';
export {
  ADE20K_CLASSES,
  DIGIT_SCENE_CLASSES,
  openDigitScenes,
  openSegmentationFolder,
  segmentationBatches,
  type DigitScenesOptions,
  type SegmentationBatch,
  type SegmentationBatchOptions,
  type SegmentationDataset,
  type SegmentationFolderOptions,
  type SegmentationSample,
  type SkippedSegmentationSample,
} from './segmentation.js';
export { photometricDistortion, rescaledSize, resizeBilinearRgb, resizeNearest, segmentationTestResize, segmentationTrainTransform } from './segmentation-transforms.js';
export {
  DIGIT_DETECTION_CLASSES,
  decodeRle,
  encodeRle,
  maskBox,
  openCocoFolder,
  openDigitDetectionScenes,
  rasterizePolygons,
  type CocoDataset,
  type CocoFolderOptions,
  type DetectionDataset,
  type DetectionInstance,
  type DetectionSample,
  type Rle,
} from './detection.js';
export {
  DETECTION_PAD_PIXEL,
  LSJ_SCALE_RANGE,
  clipPolygonToBox,
  detectionTestResize,
  detectionTrainTransform,
  lsjResizedSize,
  movePolygons,
  pilNearestSource,
  type DetectionTestInput,
  type DetectionTrainTransformOptions,
  type TransformedDetectionSample,
} from './detection-transforms.js';
