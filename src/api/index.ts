export * from './config.js';
export * from './pretrainer.js';
export * from './fixture.js';
export * from './classifier.js';
export * from './segmenter.js';
export * from './detector.js';
export * from './task-model.js';
