//! Data parallel (`train.devices`): one replica of the model per device, each in a thread that
//! lives as long as the run, each on an equal slice of every micro-batch's rows. Their LoRA
//! gradients are all-reduced with burn-collective, so every optimizer step applies the sum that
//! one device running the whole batch would have computed.
//!
//! The replica on the first device is the training loop's own model. It alone holds AdamW's
//! state and writes the checkpoints, and it hands the others its LoRA tensors with each step, so
//! they hold nothing a resumed run would need: resume works as on one device.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};

use super::optimizer::AdamW;
use super::step::{apply_grads, lora_params, set_lora_params, shard_grads, Shard, StepOptions, StepStats};
use crate::backend::Backend;
use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::model::CausalLm;

/// burn-collective keeps one session per backend type and process, so two data-parallel runs
/// in one process (tests) take turns.
static SESSION: Mutex<()> = Mutex::new(());

/// The replicas besides the training loop's own, with their threads.
pub struct Replicas<B: Backend> {
    workers: Vec<Worker<B>>,
    _session: MutexGuard<'static, ()>,
}

struct Worker<B: Backend> {
    jobs: Option<Sender<Job<B>>>,
    /// The replica's share of the step's loss, once its gradients went into the all-reduce.
    done: Receiver<std::result::Result<f64, String>>,
    thread: Option<JoinHandle<()>>,
}

/// One optimizer step for a replica: the LoRA tensors to start from and the step's batches.
struct Job<B: Backend> {
    params: Vec<Tensor<B, 2>>,
    batches: Arc<Vec<Batch>>,
    label_total: usize,
    options: StepOptions,
}

impl<B: Backend> Replicas<B> {
    /// Starts a replica on each of `devices` after the first, which is `model`'s. A replica on
    /// the same device as `model` is a clone of it (its frozen tensors shared, not copied);
    /// elsewhere `load` builds one.
    pub fn start(
        model: &CausalLm<Autodiff<B>>,
        devices: &[B::Device],
        load: impl Fn(&B::Device) -> Result<CausalLm<Autodiff<B>>>,
    ) -> Result<Self> {
        let session = SESSION.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // A session an earlier run in this process left half done (an error) is forgotten.
        burn_collective::reset_collective::<B>();
        let count = devices.len();
        let mut workers = Vec::with_capacity(count - 1);
        for (peer, device) in devices.iter().enumerate().skip(1) {
            let replica = if *device == devices[0] { model.clone() } else { load(device)? };
            let (jobs, job_rx) = channel();
            let (done_tx, done) = channel();
            let device = device.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tune-replica-{peer}"))
                .spawn(move || serve(peer, count, replica, device, job_rx, done_tx))
                .map_err(|e| Error::Unsupported(format!("train.devices: cannot start replica {peer}: {e}")))?;
            workers.push(Worker { jobs: Some(jobs), done, thread: Some(thread) });
        }
        register::<B>(0, count, devices[0].clone())?;
        for (peer, w) in workers.iter().enumerate() {
            w.done.recv().map_err(|_| lost(peer + 1))?.map_err(Error::Unsupported)?;
        }
        Ok(Replicas { workers, _session: session })
    }

    /// Replicas in all, the training loop's own included.
    pub fn count(&self) -> usize {
        self.workers.len() + 1
    }

    /// [`super::step::train_step`] over every replica: each takes its slice of every micro-batch, the
    /// gradients are summed across replicas, and `model` takes the AdamW step.
    pub fn train_step(
        &mut self,
        model: &mut CausalLm<Autodiff<B>>,
        opt: &mut AdamW<B>,
        batches: &[Batch],
        options: StepOptions,
        device: &B::Device,
    ) -> Result<StepStats> {
        let count = self.count();
        let label_total: usize = batches.iter().map(Batch::label_count).sum();
        let params: Vec<Tensor<B, 2>> = lora_params(model).into_iter().map(|p| p.inner()).collect();
        let shared = Arc::new(batches.to_vec());
        for (peer, w) in self.workers.iter().enumerate() {
            let job = Job { params: params.clone(), batches: shared.clone(), label_total, options };
            w.jobs.as_ref().expect("replicas run until dropped").send(job).map_err(|_| lost(peer + 1))?;
        }
        let (mut loss, grads) = shard_grads(model, batches, label_total, options, Shard { index: 0, count }, device);
        let grads = sum_across_replicas(0, count, grads)?;
        // Added in replica order, so that the logged loss is the same in every run.
        for (peer, w) in self.workers.iter().enumerate() {
            loss += w.done.recv().map_err(|_| lost(peer + 1))?.map_err(Error::Unsupported)?;
        }
        let grad_norm = apply_grads(model, opt, grads, options);
        Ok(StepStats { loss: loss as f32, grad_norm, tokens: batches.iter().map(|b| b.tokens).sum() })
    }
}

impl<B: Backend> Drop for Replicas<B> {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.jobs = None;
        }
        // Releases any replica still waiting in an all-reduce (the loop stopped on an error or
        // a panic between its jobs and its own all-reduce), so that the threads can be joined.
        burn_collective::reset_collective::<B>();
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn lost(peer: usize) -> Error {
    Error::Unsupported(format!("train.devices: replica {peer} stopped"))
}

fn register<B: Backend>(peer: usize, count: usize, device: B::Device) -> Result<()> {
    let config = CollectiveConfig::default().with_num_devices(count);
    burn_collective::register::<B>(PeerId(peer as u32), device, config)
        .map_err(|e| Error::Unsupported(format!("train.devices: replica {peer} could not join the all-reduce: {e:?}")))
}

/// A replica's thread: a step per job, until the training loop drops its sender.
fn serve<B: Backend>(
    peer: usize,
    count: usize,
    mut model: CausalLm<Autodiff<B>>,
    device: B::Device,
    jobs: Receiver<Job<B>>,
    done: Sender<std::result::Result<f64, String>>,
) {
    if let Err(e) = register::<B>(peer, count, device.clone()) {
        let _ = done.send(Err(e.to_string()));
        return;
    }
    let _ = done.send(Ok(0.0));
    for job in jobs {
        let shapes: Vec<[usize; 2]> = job.params.iter().map(|p| p.dims()).collect();
        set_lora_params(&mut model, job.params.into_iter().map(|p| Tensor::from_inner(p).require_grad()).collect());
        let shard = Shard { index: peer, count };
        let step = catch_unwind(AssertUnwindSafe(|| shard_grads(&mut model, &job.batches, job.label_total, job.options, shard, &device)));
        // The other replicas wait in the all-reduce for this one's part: a failed step still
        // takes part (with zeros), and reports the failure instead of its loss.
        let (result, grads) = match step {
            Ok((loss, grads)) => (Ok(loss), grads),
            Err(panic) => {
                let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                let zeros = shapes.iter().map(|&s| Tensor::zeros(s, &device)).collect();
                (Err(format!("train.devices: replica {peer} failed: {}", msg.unwrap_or_default())), zeros)
            }
        };
        let result = sum_across_replicas(peer, count, grads).map_err(|e| e.to_string()).and(result);
        if done.send(result).is_err() {
            break;
        }
    }
    let _ = burn_collective::finish_collective::<B>(PeerId(peer as u32));
}

/// The sum of every replica's `grads`, the same on each replica and in every run.
///
/// burn-collective adds the peers' tensors in whatever order its hash map yields them, and
/// float addition is not associative: with three or more replicas a plain all-reduce could round
/// differently from one run to the next, and a resumed run would not repeat the uninterrupted
/// one. So each replica puts its gradients in its own row of an `[replicas, total]` tensor of
/// zeros: the all-reduce then adds only zeros, which is exact in any order, and each replica
/// adds the rows up in replica order. The all-reduce moves `replicas` times the gradients, a
/// small cost for LoRA's.
fn sum_across_replicas<B: Backend>(peer: usize, count: usize, grads: Vec<Tensor<B, 2>>) -> Result<Vec<Tensor<B, 2>>> {
    let shapes: Vec<[usize; 2]> = grads.iter().map(|g| g.dims()).collect();
    let total: usize = shapes.iter().map(|[r, c]| r * c).sum();
    let device = grads.first().map(|g| g.device()).unwrap_or_default();
    let flat = Tensor::cat(grads.into_iter().map(|g| g.reshape([1, -1])).collect(), 1);
    let mut rows = Vec::with_capacity(3);
    if peer > 0 {
        rows.push(Tensor::zeros([peer, total], &device));
    }
    rows.push(flat);
    if peer + 1 < count {
        rows.push(Tensor::zeros([count - peer - 1, total], &device));
    }
    let slots: Tensor<B, 2> = Tensor::cat(rows, 0);
    let reduced = burn_collective::all_reduce::<B>(PeerId(peer as u32), slots.into_primitive().tensor(), ReduceOperation::Sum)
        .map_err(|e| Error::Unsupported(format!("train.devices: the all-reduce failed on replica {peer}: {e:?}")))?;
    let reduced = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(reduced));
    let mut sum = reduced.clone().narrow(0, 0, 1);
    for r in 1..count {
        sum = sum + reduced.clone().narrow(0, r, 1);
    }
    let mut offset = 0;
    Ok(shapes
        .into_iter()
        .map(|shape| {
            let n = shape[0] * shape[1];
            let g = sum.clone().narrow(1, offset, n).reshape(shape);
            offset += n;
            g
        })
        .collect())
}
