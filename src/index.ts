export * from './api/index.js';
export * from './data/index.js';
export { pretrain, writeReconstruction, type PretrainRunOptions, type PretrainProgress, type PretrainSummary } from './tasks/pretrain.js';
export { lrAt, polyLrAt, scaledLr, type LrSchedule, type PolySchedule } from './tasks/schedule.js';
export { evaluateSegmentation, evaluateSegmenter, segment, type EvaluateSegmenterOptions, type SegEvalSummary, type SegmentRunOptions, type SegmentRunSummary } from './tasks/segment.js';
export {
  defaultEvalData,
  evaluate,
  evaluateDataset,
  finetune,
  linprobe,
  type ClassifyProgress,
  type ClassifyRunOptions,
  type ClassifyRunSummary,
  type EvalSummary,
  type EvaluateOptions,
} from './tasks/classify.js';
export { extractFeatures, type FeaturesOptions, type FeaturesSummary } from './tasks/features.js';
export type { TrainingProgress } from './tasks/run.js';
export type { TrainingRunOptions } from './tasks/run.js';
export {
  AREA_RANGES,
  DetectionEvaluator,
  boxIoU,
  formatDetectionScores,
  maskIoU,
  type DetectionScores,
  type EvalDetection,
  type EvalGroundTruth,
  type EvalImage,
  type IouType,
} from './tasks/detection-eval.js';
