/**
 * Labeled subsets for low-label evaluation: fine-tune or probe on `perClass` images of each class,
 * evaluate on the full test split (the protocol behind SimCLR's and MAE's "1% / 10% of ImageNet
 * labels" rows). Pretraining matters most where labels are scarce, so this is the setting in which
 * the transfer benchmark compares a pretrained encoder with a random one.
 */
import type { ImageDataset } from './datasets.js';
import { createRng, permutation } from './rng.js';

/**
 * `perClass` samples of every class, drawn uniformly without replacement with `seed`; the order is
 * by class, then by the draw (the loader shuffles anyway). The same (dataset, perClass, seed) gives
 * the same subset, so a resumed run and a paired run (pretrained vs random) see the same images.
 * Throws when the dataset is unlabeled or a class has fewer than `perClass` samples.
 */
export function classBalancedSubset(dataset: ImageDataset, perClass: number, seed: number): ImageDataset {
  if (!Number.isInteger(perClass) || perClass < 1) throw new RangeError(`labelsPerClass must be a positive integer, got ${perClass}`);
  const byClass = new Map<number, number[]>();
  for (let i = 0; i < dataset.length; i++) {
    const label = dataset.label(i);
    if (label === undefined) throw new Error(`labelsPerClass: dataset '${dataset.name}' has no label for ${dataset.describe(i)}; a class-balanced subset needs labels`);
    let members = byClass.get(label);
    if (!members) byClass.set(label, (members = []));
    members.push(i);
  }
  const rng = createRng(seed);
  const picked: number[] = [];
  for (const label of [...byClass.keys()].sort((a, b) => a - b)) {
    const members = byClass.get(label)!;
    if (members.length < perClass) {
      const name = dataset.classes?.[label] ?? String(label);
      throw new RangeError(`labelsPerClass ${perClass}: class '${name}' of dataset '${dataset.name}' has only ${members.length} samples`);
    }
    const order = permutation(members.length, rng);
    for (let k = 0; k < perClass; k++) picked.push(members[order[k]!]!);
  }
  return {
    name: `${dataset.name} (${perClass} per class)`,
    length: picked.length,
    classes: dataset.classes,
    label: (index) => dataset.label(picked[index]!),
    source: (index) => dataset.source(picked[index]!),
    describe: (index) => dataset.describe(picked[index]!),
  };
}
