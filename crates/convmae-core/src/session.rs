//! A model's home: one dedicated worker thread owns the trainer (device, parameters, optimizer)
//! and runs commands in order. Callers get answers through callbacks, so the N-API layer can
//! resolve Promises without pinning Node's libuv pool, and a panic in the compute becomes an
//! error for that command instead of taking the process down.

use crate::checkpoint::{self, LoadReport};
use crate::classify::{ClassifierTrainer, EvalStats, Features, TrainStepOptions, TrainStepStats};
use crate::recon::{self, Reconstruction};
use crate::segment::{SegEval, SegTrainStats, SegmenterTrainer};
use crate::detect::{DetTrainStats, DetectorTrainer};
use crate::model::detector::{ImageDetections, ImageTargets};
use crate::threads::{CpuThreads, ThreadChoice};
use crate::train::{Batch, Pretrainer, StepOptions, StepStats};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

/// Owned images for a command: uint8 channels-last [batch, height, width, 3].
pub struct Images {
    pub pixels: Vec<u8>,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
}

impl Images {
    fn view(&self) -> Batch<'_> {
        Batch { pixels: &self.pixels, batch: self.batch, height: self.height, width: self.width, channels: 3 }
    }
}

pub enum Command {
    Step { images: Images, opts: StepOptions },
    Save { path: PathBuf, extra: String },
    Load { path: PathBuf, strict: bool },
    InitFrom { path: PathBuf },
    Reconstruct { images: Images, seed: u64 },
}

pub enum Reply {
    Step(StepStats),
    Saved,
    Loaded { report: LoadReport, extra: String },
    Reconstruction(Reconstruction),
}

pub type Callback<R> = Box<dyn FnOnce(Result<R, String>) + Send>;

/// A command with its caller's callback, as a session's queue carries them.
type Letter<W> = (<W as Worker>::Command, Callback<<W as Worker>::Reply>);
/// The worker's end of a session's queue.
type Inbox<W> = mpsc::Receiver<Letter<W>>;

/// What `Worker::start` did with a command.
pub enum Started<R> {
    /// Done; here is its answer.
    Done(Result<R, String>),
    /// Queued on the device; its answer comes later from `take_settled`.
    InFlight,
}

/// What a session's worker thread owns and how it answers commands.
pub trait Worker: Send + 'static {
    type Command: Send + 'static;
    type Reply: Send + 'static;
    fn run(&mut self, command: Self::Command) -> Result<Self::Reply, String>;
    /// Whether the model computes on the CPU (its commands then run inside rayon's pool).
    fn on_cpu(&self) -> bool;
    /// Whether `command` is a training step (what `threads: auto` times).
    fn is_step(command: &Self::Command) -> bool;
    /// Starts `command`. A worker that can overlap commands (a GPU pretraining step) may leave
    /// it in flight, to be settled by a later `start` or by `settle`; the default runs it.
    fn start(&mut self, command: Self::Command) -> Started<Self::Reply> {
        Started::Done(self.run(command))
    }
    /// Settles the command in flight, if any (its answer then comes from `take_settled`).
    fn settle(&mut self) {}
    /// Whether the command in flight, if any, can be settled without waiting (a GPU step: its
    /// loss has reached the host). Until it can, the worker waits for the next command rather
    /// than for the device (`serve`).
    fn in_flight_ready(&self) -> bool {
        true
    }
    /// The oldest answer of a settled in-flight command not yet taken.
    fn take_settled(&mut self) -> Option<Result<Self::Reply, String>> {
        None
    }
}

fn message(e: candle_core::Error) -> String {
    e.to_string()
}

impl Worker for Pretrainer {
    type Command = Command;
    type Reply = Reply;
    fn run(&mut self, command: Command) -> Result<Reply, String> {
        match command {
            Command::Step { images, opts } => self.step(&images.view(), &opts).map(Reply::Step).map_err(message),
            Command::Save { path, extra } => checkpoint::save_pretrainer(self, &path, &extra).map(|_| Reply::Saved).map_err(message),
            Command::Load { path, strict } => checkpoint::load_pretrainer(self, &path, strict)
                .map(|(report, extra)| Reply::Loaded { report, extra })
                .map_err(message),
            Command::InitFrom { path } => checkpoint::init_pretrainer_from(self, &path)
                .map(|report| Reply::Loaded { report, extra: "{}".into() })
                .map_err(message),
            Command::Reconstruct { images, seed } => {
                recon::reconstruct(&self.model, &images.view(), seed).map(Reply::Reconstruction).map_err(message)
            }
        }
    }

    fn on_cpu(&self) -> bool {
        self.model.device().is_cpu()
    }

    fn is_step(command: &Command) -> bool {
        matches!(command, Command::Step { .. })
    }

    /// A step is left in flight (train.rs `start_step`); any other command settles the step in
    /// flight first, so that it sees the step's update. With `CONVMAE_STEPS=serial` a step is
    /// run to its end on the device before it is answered.
    fn start(&mut self, command: Command) -> Started<Reply> {
        match command {
            Command::Step { images, opts } if crate::device::serial_steps() => {
                let r = self.step(&images.view(), &opts).and_then(|s| self.model.device().synchronize().map(|_| s));
                Started::Done(r.map(Reply::Step).map_err(message))
            }
            Command::Step { images, opts } => match self.start_step(&images.view(), &opts) {
                None => Started::InFlight,
                Some(r) => Started::Done(r.map(Reply::Step).map_err(message)),
            },
            other => {
                self.settle_in_flight();
                Started::Done(self.run(other))
            }
        }
    }

    fn settle(&mut self) {
        self.settle_in_flight();
    }

    fn in_flight_ready(&self) -> bool {
        Pretrainer::in_flight_ready(self)
    }

    fn take_settled(&mut self) -> Option<Result<Reply, String>> {
        self.take_settled().map(|r| r.map(Reply::Step).map_err(message))
    }
}

pub enum ClassifierCommand {
    Train { images: Images, opts: TrainStepOptions },
    Evaluate { images: Images, labels: Option<Vec<usize>> },
    Features { images: Images, maps: bool },
    Save { path: PathBuf, extra: String },
    /// Exact restore (resume or evaluation).
    Load { path: PathBuf, strict: bool },
    /// Official initialization from a pretrained encoder (fresh head).
    InitFrom { path: PathBuf },
    /// Raises a Rust panic on the worker (tests of the panic-to-Error path).
    Panic,
}

pub enum ClassifierReply {
    Trained(TrainStepStats),
    Evaluated(EvalStats),
    Features(Features),
    Saved,
    Loaded { report: LoadReport, extra: String },
}

impl Worker for ClassifierTrainer {
    type Command = ClassifierCommand;
    type Reply = ClassifierReply;
    fn run(&mut self, command: ClassifierCommand) -> Result<ClassifierReply, String> {
        use ClassifierCommand as C;
        use ClassifierReply as R;
        match command {
            C::Train { images, opts } => self.train_step(&images.view(), &opts).map(R::Trained).map_err(message),
            C::Evaluate { images, labels } => self.evaluate(&images.view(), labels.as_deref()).map(R::Evaluated).map_err(message),
            C::Features { images, maps } => self.features(&images.view(), maps).map(R::Features).map_err(message),
            C::Save { path, extra } => checkpoint::save_classifier(self, &path, &extra).map(|_| R::Saved).map_err(message),
            C::Load { path, strict } => {
                checkpoint::load_classifier(self, &path, strict).map(|(report, extra)| R::Loaded { report, extra }).map_err(message)
            }
            C::InitFrom { path } => {
                checkpoint::init_classifier_from(self, &path).map(|report| R::Loaded { report, extra: "{}".into() }).map_err(message)
            }
            C::Panic => panic!("panic requested by the caller"),
        }
    }

    fn on_cpu(&self) -> bool {
        self.model.device().is_cpu()
    }

    fn is_step(command: &ClassifierCommand) -> bool {
        matches!(command, ClassifierCommand::Train { .. })
    }
}

pub enum SegmenterCommand {
    /// One step on images and their label maps ([B * H * W], 255 = ignore).
    Train { images: Images, labels: Vec<u8>, lr: f64 },
    Evaluate { images: Images, labels: Option<Vec<u8>> },
    /// Slide inference of one image of any size, scored at `original` size (`evaluate_slide`).
    EvaluateSlide { image: Images, original: (usize, usize), labels: Option<Vec<u8>>, stride: usize },
    Save { path: PathBuf, extra: String },
    /// Exact restore (resume or evaluation): ours, or an official mmseg UperNet .pth.
    Load { path: PathBuf, strict: bool },
    /// The official initialization of the backbone from a pretrained encoder (fresh heads).
    InitFrom { path: PathBuf },
}

pub enum SegmenterReply {
    Trained(SegTrainStats),
    Evaluated(SegEval),
    Saved,
    Loaded { report: LoadReport, extra: String },
}

impl Worker for SegmenterTrainer {
    type Command = SegmenterCommand;
    type Reply = SegmenterReply;
    fn run(&mut self, command: SegmenterCommand) -> Result<SegmenterReply, String> {
        use SegmenterCommand as C;
        use SegmenterReply as R;
        match command {
            C::Train { images, labels, lr } => self.train_step(&images.view(), &labels, lr).map(R::Trained).map_err(message),
            C::Evaluate { images, labels } => self.evaluate(&images.view(), labels.as_deref()).map(R::Evaluated).map_err(message),
            C::EvaluateSlide { image, original, labels, stride } => {
                self.evaluate_slide(&image.view(), original, labels.as_deref(), stride).map(R::Evaluated).map_err(message)
            }
            C::Save { path, extra } => checkpoint::save_segmenter(self, &path, &extra).map(|_| R::Saved).map_err(message),
            C::Load { path, strict } => {
                checkpoint::load_segmenter(self, &path, strict).map(|(report, extra)| R::Loaded { report, extra }).map_err(message)
            }
            C::InitFrom { path } => {
                checkpoint::init_segmenter_from(self, &path).map(|report| R::Loaded { report, extra: "{}".into() }).map_err(message)
            }
        }
    }

    fn on_cpu(&self) -> bool {
        self.model.device().is_cpu()
    }

    fn is_step(command: &SegmenterCommand) -> bool {
        matches!(command, SegmenterCommand::Train { .. })
    }
}

pub enum DetectorCommand {
    /// One step on images and their annotations (one `ImageTargets` per image).
    Train { images: Images, targets: Vec<ImageTargets>, lr: f64 },
    /// Detections with boxes and masks at each image's `output` size (height, width).
    /// `extents`: each image's (height, width) at the top left of its input (None: all of it).
    Detect { images: Images, extents: Option<Vec<(usize, usize)>>, output: Vec<(usize, usize)> },
    Save { path: PathBuf, extra: String },
    /// Exact restore (resume or evaluation): ours, or an official detectron2 model_final.
    Load { path: PathBuf, strict: bool },
    /// The official initialization of the backbone from a pretrained encoder (fresh FPN and heads).
    InitFrom { path: PathBuf },
}

pub enum DetectorReply {
    Trained(DetTrainStats),
    Detected(Vec<ImageDetections>),
    Saved,
    Loaded { report: LoadReport, extra: String },
}

impl Worker for DetectorTrainer {
    type Command = DetectorCommand;
    type Reply = DetectorReply;
    fn run(&mut self, command: DetectorCommand) -> Result<DetectorReply, String> {
        use DetectorCommand as C;
        use DetectorReply as R;
        match command {
            C::Train { images, targets, lr } => self.train_step(&images.view(), &targets, lr).map(R::Trained).map_err(message),
            C::Detect { images, extents, output } => self.detect(&images.view(), extents.as_deref(), &output).map(R::Detected).map_err(message),
            C::Save { path, extra } => checkpoint::save_detector(self, &path, &extra).map(|_| R::Saved).map_err(message),
            C::Load { path, strict } => checkpoint::load_detector(self, &path, strict).map(|(report, extra)| R::Loaded { report, extra }).map_err(message),
            C::InitFrom { path } => checkpoint::init_detector_from(self, &path).map(|report| R::Loaded { report, extra: "{}".into() }).map_err(message),
        }
    }

    fn on_cpu(&self) -> bool {
        self.model.device().is_cpu()
    }

    fn is_step(command: &DetectorCommand) -> bool {
        matches!(command, DetectorCommand::Train { .. })
    }
}

pub struct Session<W: Worker> {
    sender: Option<mpsc::Sender<Letter<W>>>,
    worker: Option<JoinHandle<()>>,
    /// The CPU threads the model's steps run on now (`threads.rs`).
    threads_in_use: Arc<AtomicUsize>,
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error (Rust panic) in the model worker: {text}")
}

/// Runs `f` on the trainer. On the CPU it runs on one of the worker threads of `pool` (rayon's
/// global pool where None; see threads.rs) while this thread waits: every op of a step
/// parallelizes with rayon, and an op started from outside the pool is injected into it and
/// waited for (a handoff and a wake-up per op), while a third thread competes with the pool's
/// for the cores. From inside the pool the op's loops start on
/// the current worker. Measured on 2 cores, builds alternated (benches/results/pretrain-2026-11-26.md,
/// tags in-pool-ab*): convmae-tiny 26.5 / 25.7 -> 21.6 / 21.3 ms a step, ConvMAE-B 2342 / 2362 ->
/// 2176 / 2228. A CUDA model's commands stay on this thread, which owns its stream. A panic
/// becomes an error for the command.
fn run_guarded<W: Worker, R: Send>(trainer: &mut W, pool: Option<&rayon::ThreadPool>, f: impl FnOnce(&mut W) -> R + Send) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(|| match pool {
        _ if !trainer.on_cpu() => f(trainer),
        Some(pool) => pool.install(|| f(trainer)),
        None => rayon::scope(|_| f(trainer)),
    }))
    .map_err(panic_message)
}

/// Answers the callers of the commands left in flight whose answers have come, oldest first.
/// If settling panicked, or the worker has no answer for a command it left in flight, that
/// command gets an error rather than no answer.
fn answer_settled<W: Worker>(trainer: &mut W, pool: Option<&rayon::ThreadPool>, waiting: &mut VecDeque<Callback<W::Reply>>, settle: bool) {
    if settle {
        if let Err(e) = run_guarded(trainer, pool, |t| t.settle()) {
            for reply in waiting.drain(..) {
                reply(Err(e.clone()));
            }
            return;
        }
    }
    while let Some(reply) = waiting.pop_front() {
        match run_guarded(trainer, pool, |t| t.take_settled()) {
            Ok(Some(answer)) => reply(answer),
            Ok(None) if settle => reply(Err("internal error: the model worker settled a step without an answer".into())),
            Ok(None) => {
                waiting.push_front(reply);
                return;
            }
            Err(e) => reply(Err(e)),
        }
    }
}

/// How often the worker looks at whether the step in flight has its loss while it waits for
/// the next command (`serve`): a step's answer comes at most this much after its loss.
const IN_FLIGHT_POLL: std::time::Duration = std::time::Duration::from_micros(200);

/// The worker thread's loop. Commands run in order. One left in flight (a GPU step, whose
/// device work is queued) is settled when the next command starts (overlapping the two) or,
/// when no command is waiting, as soon as it can be settled without waiting for the device
/// (its loss has reached the host), so that a caller awaiting each step gets its answer then.
/// Until then the worker waits for the next command instead: a caller that keeps two steps
/// queued sends the next one when the one before is answered, a moment after this one started;
/// settling at once would block the worker on the device's forward in that moment, and the next
/// step would be built only after it, with the device idle (one step in two, as the pairs of
/// answers showed: the CPU rehearsal of the GPU check, 2026-11-27).
fn serve<W: Worker>(trainer: &mut Result<W, String>, threads: &mut CpuThreads, receiver: Inbox<W>) {
    let mut waiting: VecDeque<Callback<W::Reply>> = VecDeque::new();
    loop {
        let next = if waiting.is_empty() {
            receiver.recv().ok()
        } else {
            match receiver.try_recv() {
                Ok(next) => Some(next),
                Err(mpsc::TryRecvError::Empty) => match trainer {
                    Ok(t) if !t.in_flight_ready() => match receiver.recv_timeout(IN_FLIGHT_POLL) {
                        Ok(next) => Some(next),
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(mpsc::RecvTimeoutError::Disconnected) => None,
                    },
                    Ok(t) => {
                        answer_settled(t, threads.pool(), &mut waiting, true);
                        continue;
                    }
                    // No step is left in flight by a worker whose model failed (every command
                    // is answered with its error at once), so nothing waits here; should one,
                    // it gets the error rather than a worker spinning on an empty inbox.
                    Err(e) => {
                        for reply in waiting.drain(..) {
                            reply(Err(e.clone()));
                        }
                        continue;
                    }
                },
                Err(mpsc::TryRecvError::Disconnected) => None,
            }
        };
        let Some((command, reply)) = next else { break };
        let t = match trainer {
            Ok(t) => t,
            Err(e) => {
                reply(Err(format!("the model could not be created: {e}")));
                continue;
            }
        };
        let (timed, began) = (t.on_cpu() && W::is_step(&command), Instant::now());
        let started = run_guarded(t, threads.pool(), |t| t.start(command)).unwrap_or_else(|e| Started::Done(Err(e)));
        if timed {
            threads.record_step(began.elapsed());
        }
        answer_settled(t, threads.pool(), &mut waiting, false);
        match started {
            Started::Done(answer) => {
                // Anything still unanswered ahead of this command cannot be answered later.
                for earlier in waiting.drain(..) {
                    earlier(Err("internal error: the model worker lost a step's answer".into()));
                }
                reply(answer)
            }
            Started::InFlight => waiting.push_back(reply),
        }
    }
    if let Ok(t) = trainer {
        answer_settled(t, threads.pool(), &mut waiting, true);
    }
}

impl<W: Worker> Session<W> {
    /// Starts the worker; `make` builds the trainer on the worker thread itself (building
    /// ConvMAE-B's 115M weights takes a while, and the caller's thread may be Node's main thread).
    /// If `make` fails, every command is answered with its error. On the CPU the steps run on
    /// the threads `threads` says (threads.rs).
    pub fn start(make: impl FnOnce() -> Result<W, String> + Send + 'static, threads: ThreadChoice) -> Self {
        let (sender, receiver) = mpsc::channel::<Letter<W>>();
        let threads_in_use = Arc::new(AtomicUsize::new(0));
        let in_use = threads_in_use.clone();
        let worker = std::thread::Builder::new()
            .name("convmae-model".into())
            .spawn(move || {
                let (mut trainer, mut threads) = match CpuThreads::new(threads, in_use.clone()) {
                    Ok(threads) => (catch_unwind(AssertUnwindSafe(make)).unwrap_or_else(|p| Err(panic_message(p))), threads),
                    Err(e) => (Err(e), CpuThreads::new(ThreadChoice::Fixed(rayon::current_num_threads()), in_use).expect("the global pool")),
                };
                serve(&mut trainer, &mut threads, receiver);
            })
            .expect("cannot spawn the model worker thread");
        Self { sender: Some(sender), worker: Some(worker), threads_in_use }
    }

    /// The CPU threads the model's steps run on now: with `threads: auto` the count being
    /// timed, then the one chosen (0 until the worker has started).
    pub fn threads_in_use(&self) -> usize {
        self.threads_in_use.load(Ordering::Relaxed)
    }

    /// Queues a command; the callback runs on the worker thread when it is done.
    pub fn submit(&self, command: W::Command, reply: Callback<W::Reply>) {
        match &self.sender {
            Some(s) => {
                if let Err(mpsc::SendError((_, reply))) = s.send((command, reply)) {
                    reply(Err("the model worker has stopped".into()));
                }
            }
            None => reply(Err("this session was disposed".into())),
        }
    }

    /// Stops accepting commands; the worker finishes the queued ones, then frees the model and
    /// exits. Does not wait for it (the caller may be Node's main thread).
    pub fn dispose(&mut self) {
        self.sender.take();
        self.worker.take();
    }

    /// Like `dispose`, then waits until the worker has exited (tests, CLI shutdown).
    pub fn dispose_and_wait(&mut self) {
        self.sender.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }

    pub fn is_disposed(&self) -> bool {
        self.sender.is_none()
    }
}

impl<W: Worker> Drop for Session<W> {
    fn drop(&mut self) {
        // Closing the channel ends the worker loop; don't block a finalizer on it.
        self.sender.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A worker whose commands stay in flight as a GPU step's do: starting one settles the one
    /// before (as `start_step` does), and the one in flight can be settled without waiting only
    /// once `loss_ready` is set. `log` records what the worker did, in order.
    struct FakeDevice {
        log: Arc<Mutex<Vec<String>>>,
        loss_ready: Arc<AtomicBool>,
        in_flight: Option<u32>,
        settled: VecDeque<Result<u32, String>>,
    }

    impl Worker for FakeDevice {
        type Command = u32;
        type Reply = u32;
        fn run(&mut self, command: u32) -> Result<u32, String> {
            Ok(command)
        }
        fn on_cpu(&self) -> bool {
            false
        }
        fn is_step(_: &u32) -> bool {
            true
        }
        fn start(&mut self, command: u32) -> Started<u32> {
            self.log.lock().unwrap().push(format!("start {command}"));
            self.settle();
            self.in_flight = Some(command);
            Started::InFlight
        }
        fn settle(&mut self) {
            if let Some(c) = self.in_flight.take() {
                self.log.lock().unwrap().push(format!("settle {c}"));
                self.settled.push_back(Ok(c));
            }
        }
        fn in_flight_ready(&self) -> bool {
            self.in_flight.is_none() || self.loss_ready.load(Ordering::SeqCst)
        }
        fn take_settled(&mut self) -> Option<Result<u32, String>> {
            self.settled.pop_front()
        }
    }

    /// A session on a fake device, its log, its loss flag, and the answers' channel.
    type FakeSession = (Session<FakeDevice>, Arc<Mutex<Vec<String>>>, Arc<AtomicBool>, mpsc::Receiver<Result<u32, String>>, mpsc::Sender<Result<u32, String>>);

    fn fake_session() -> FakeSession {
        let (log, ready) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (l, r) = (log.clone(), ready.clone());
        let session = Session::start(move || Ok(FakeDevice { log: l, loss_ready: r, in_flight: None, settled: VecDeque::new() }), ThreadChoice::Auto);
        let (tx, rx) = mpsc::channel();
        (session, log, ready, rx, tx)
    }

    fn reply_to(tx: &mpsc::Sender<Result<u32, String>>) -> Callback<u32> {
        let tx = tx.clone();
        Box::new(move |r| tx.send(r).unwrap())
    }

    /// A caller that queues the next step a moment after the first started (as one keeping two
    /// steps queued does) gets the two overlapped: the second starts before the first is
    /// settled, although nothing was waiting when the first started.
    #[test]
    fn a_step_sent_while_the_one_before_is_in_flight_starts_before_it_is_settled() {
        let (mut session, log, ready, rx, tx) = fake_session();
        session.submit(1, reply_to(&tx));
        std::thread::sleep(Duration::from_millis(30));
        assert!(rx.try_recv().is_err(), "the first step was answered before its loss was ready");
        session.submit(2, reply_to(&tx));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(1));
        ready.store(true, Ordering::SeqCst);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(2));
        session.dispose_and_wait();
        assert_eq!(*log.lock().unwrap(), ["start 1", "start 2", "settle 1", "settle 2"]);
    }

    /// A caller that awaits each step gets its answer once its loss is ready, without sending
    /// anything more.
    #[test]
    fn a_step_alone_is_answered_once_its_loss_is_ready() {
        let (mut session, log, ready, rx, tx) = fake_session();
        session.submit(7, reply_to(&tx));
        std::thread::sleep(Duration::from_millis(30));
        assert!(rx.try_recv().is_err(), "answered before its loss was ready");
        ready.store(true, Ordering::SeqCst);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(7));
        session.dispose_and_wait();
        assert_eq!(*log.lock().unwrap(), ["start 7", "settle 7"]);
    }
}
