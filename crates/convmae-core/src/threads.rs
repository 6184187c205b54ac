//! How many CPU threads a model's steps run on: rayon's whole pool (the default), a fixed
//! number, or the fastest of a few counts, found by timing the first steps (`auto`).
//!
//! Why not always all of them: every parallel loop of a step wakes the pool's sleeping threads,
//! and a small model's ops can be too short to pay for it; where that is so depends on the
//! machine and the model. On the 2-core build VM the README's demo (convmae-tiny, 64 px, batch
//! 32) ran about as fast on one thread as on two, and ConvMAE-B at batch 8 much faster on two
//! (benches/results/threads-2026-11-27.md). The results do not depend on the count: every
//! kernel's reductions run in a fixed order whatever the threads, so steps on any count give the
//! same bits, and the choice changes nothing but speed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The `threads` option of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadChoice {
    /// Time the first steps on each of `all`, `all / 2`, ..., 1 threads, then keep the fastest.
    Auto,
    /// Exactly this many threads (rayon's global pool when it is its size).
    Fixed(usize),
}

impl ThreadChoice {
    /// The N-API layer's encoding of the option: absent for all of rayon's threads, 0 for `Auto`.
    pub fn from_option(count: Option<u32>) -> Self {
        match count {
            None => Self::Fixed(rayon::current_num_threads()),
            Some(0) => Self::Auto,
            Some(n) => Self::Fixed(n as usize),
        }
    }
}

/// Steps run on all of rayon's threads before the trials: the first steps of a run allocate
/// their buffers and warm the caches, and would make any count look slow.
const WARMUP_STEPS: usize = 3;
/// The trials visit every count this many times, for `BLOCK` steps in a row each time: the
/// first step of a block is not timed (other threads' caches, the pool's first wake-up), the
/// rest are, and the median of a count's timed steps decides.
const ROUNDS: usize = 2;
const BLOCK: usize = 3;

/// One step of the plan: on which candidate (an index into `CpuThreads::counts`), and whether
/// it is timed.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Trial {
    candidate: usize,
    timed: bool,
}

/// The steps after the warmup, in order, until the choice.
fn trial_plan(candidates: usize) -> Vec<Trial> {
    (0..ROUNDS).flat_map(|_| (0..candidates).flat_map(|candidate| (0..BLOCK).map(move |i| Trial { candidate, timed: i > 0 }))).collect()
}

enum Phase {
    Warmup { left: usize },
    /// `plan[next]` is the next step's trial; `times[i]` the timed steps on `counts[i]`.
    Trials { plan: Vec<Trial>, next: usize, times: Vec<Vec<Duration>> },
    Settled,
}

/// A model's thread counts and the pool its next command runs on. Lives on the model's worker.
pub struct CpuThreads {
    /// Candidate counts with their pools (None: rayon's global pool).
    counts: Vec<(usize, Option<Arc<rayon::ThreadPool>>)>,
    /// Index into `counts` of the pool in use.
    current: usize,
    phase: Phase,
    /// The count in use, for the model's owner to read.
    in_use: Arc<AtomicUsize>,
}

fn pool_of(count: usize) -> Result<Option<Arc<rayon::ThreadPool>>, String> {
    if count == rayon::current_num_threads() {
        return Ok(None);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(count)
        .thread_name(|i| format!("convmae-compute-{i}"))
        .build()
        .map(|p| Some(Arc::new(p)))
        .map_err(|e| format!("cannot start {count} compute threads: {e}"))
}

impl CpuThreads {
    pub fn new(choice: ThreadChoice, in_use: Arc<AtomicUsize>) -> Result<Self, String> {
        let all = rayon::current_num_threads();
        let (counts, phase) = match choice {
            ThreadChoice::Fixed(n) => (vec![n], Phase::Settled),
            ThreadChoice::Auto => {
                let mut counts = vec![all];
                while *counts.last().expect("not empty") > 1 {
                    counts.push(counts.last().expect("not empty") / 2);
                }
                let phase = if counts.len() == 1 { Phase::Settled } else { Phase::Warmup { left: WARMUP_STEPS } };
                (counts, phase)
            }
        };
        // The first count's pool now; the trials' when they start (a GPU model never times a
        // step, and its commands run on its own thread: it needs no pools).
        let mut counts: Vec<_> = counts.into_iter().map(|n| (n, None)).collect();
        counts[0].1 = pool_of(counts[0].0)?;
        in_use.store(counts[0].0, Ordering::Relaxed);
        Ok(Self { counts, current: 0, phase, in_use })
    }

    /// The pool the next command runs on; None: rayon's global pool.
    pub fn pool(&self) -> Option<&rayon::ThreadPool> {
        self.counts[self.current].1.as_deref()
    }

    /// Counts a step that took `took` on the current pool, and picks the pool of the next.
    pub fn record_step(&mut self, took: Duration) {
        let n = self.counts.len();
        self.phase = match std::mem::replace(&mut self.phase, Phase::Settled) {
            Phase::Settled => Phase::Settled,
            Phase::Warmup { left } if left > 1 => Phase::Warmup { left: left - 1 },
            Phase::Warmup { .. } => {
                let started: Result<(), String> = self.counts.iter_mut().skip(1).try_for_each(|(count, pool)| {
                    *pool = pool_of(*count)?;
                    Ok(())
                });
                if started.is_err() {
                    // No trials without their pools: stay on the first count.
                    self.counts.truncate(1);
                    Phase::Settled
                } else {
                    let plan = trial_plan(n);
                    self.current = plan[0].candidate;
                    Phase::Trials { plan, next: 0, times: vec![Vec::new(); n] }
                }
            }
            Phase::Trials { plan, next, mut times } => {
                let trial = plan[next];
                if trial.timed {
                    times[trial.candidate].push(took);
                }
                match plan.get(next + 1) {
                    Some(following) => {
                        self.current = following.candidate;
                        Phase::Trials { plan, next: next + 1, times }
                    }
                    None => {
                        self.settle_on_fastest(&times);
                        Phase::Settled
                    }
                }
            }
        };
        self.in_use.store(self.counts[self.current].0, Ordering::Relaxed);
    }

    fn settle_on_fastest(&mut self, times: &[Vec<Duration>]) {
        let median = |t: &Vec<Duration>| {
            let mut t = t.clone();
            t.sort();
            t[t.len() / 2]
        };
        let best = (0..times.len()).min_by_key(|&i| median(&times[i])).expect("at least one count");
        self.current = best;
        // The other pools' threads are no longer needed.
        for (i, (_, pool)) in self.counts.iter_mut().enumerate() {
            if i != best {
                pool.take();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads(choice: ThreadChoice) -> (CpuThreads, Arc<AtomicUsize>) {
        let in_use = Arc::new(AtomicUsize::new(0));
        (CpuThreads::new(choice, in_use.clone()).unwrap(), in_use)
    }

    #[test]
    fn auto_tries_each_count_after_the_warmup_then_keeps_the_fastest() {
        let all = rayon::current_num_threads();
        let (mut t, in_use) = threads(ThreadChoice::Auto);
        let counts: Vec<usize> = t.counts.iter().map(|c| c.0).collect();
        assert_eq!(counts[0], all);
        assert_eq!(*counts.last().unwrap(), 1);
        if counts.len() == 1 {
            return; // one core: nothing to choose
        }
        for _ in 0..WARMUP_STEPS {
            assert_eq!(in_use.load(Ordering::Relaxed), all);
            t.record_step(Duration::from_millis(50));
        }
        // Blocks of BLOCK steps on each count in turn, ROUNDS times. The smallest count is made
        // fastest on its timed steps, and slowest on the untimed first step of each block.
        let mut seen = Vec::new();
        for _ in 0..ROUNDS * BLOCK * counts.len() {
            let n = in_use.load(Ordering::Relaxed);
            assert_eq!(t.pool().map_or(all, |p| p.current_num_threads()), n);
            let first_of_block = seen.len() % BLOCK == 0;
            seen.push(n);
            t.record_step(Duration::from_millis(match (n, first_of_block) {
                (1, true) => 900,
                (1, false) => 10,
                _ => 20,
            }));
        }
        let blocks: Vec<usize> = seen.chunks(BLOCK).map(|b| b[0]).collect();
        assert!(seen.chunks(BLOCK).all(|b| b.iter().all(|&n| n == b[0])), "{seen:?}");
        assert_eq!(blocks, counts.iter().cycle().take(ROUNDS * counts.len()).copied().collect::<Vec<_>>());
        assert_eq!(in_use.load(Ordering::Relaxed), 1);
        t.record_step(Duration::from_millis(500));
        assert_eq!(in_use.load(Ordering::Relaxed), 1, "settled for good");
        assert_eq!(t.counts.iter().filter(|c| c.1.is_some()).count(), usize::from(all != 1));
    }

    #[test]
    fn a_fixed_count_runs_on_a_pool_of_that_size() {
        let (t, in_use) = threads(ThreadChoice::Fixed(3));
        assert_eq!(in_use.load(Ordering::Relaxed), 3);
        assert_eq!(t.pool().map_or(rayon::current_num_threads(), |p| p.current_num_threads()), 3);
    }
}
