export * from './api/index.js';
export * from './data/index.js';
export { pretrain, writeReconstruction, type PretrainRunOptions, type PretrainProgress, type PretrainSummary } from './tasks/pretrain.js';
export { detectionLrAt, lrAt, polyLrAt, scaledLr, vitdetStepDecay, type DetectionSchedule, type LrSchedule, type PolySchedule } from './tasks/schedule.js';
export { evaluateSegmentation, evaluateSegmenter, segment, type EvaluateSegmenterOptions, type SegEvalSummary, type SegmentRunOptions, type SegmentRunSummary } from './tasks/segment.js';
export {
  detect,
  detectionBatches,
  evaluateDetection,
  evaluateDetector,
  formatCocoMetrics,
  type CocoMetrics,
  type DetEvalSummary,
  type DetectRunOptions,
  type DetectRunSummary,
  type DetectionBatch,
  type DetectionBatchOptions,
  type DetectorHeadOptions,
  type EvaluateDetectorOptions,
  type SkippedDetectionSample,
} from './tasks/detect.js';
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
