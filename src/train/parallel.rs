//! Data parallel (`train.devices`): one replica of the model per device, each in a thread that
//! lives as long as the run, each on an equal slice of every micro-batch's rows. Their LoRA
//! gradients are all-reduced with burn-collective, so every optimizer step applies the sum that
//! one device running the whole batch would have computed.
//!
//! The replica on the first device is the training loop's own model. It alone holds AdamW's
//! state and writes the checkpoints, and it hands the others its LoRA tensors with each step, so
//! they hold nothing a resumed run would need: resume works as on one device.
//!
//! Over several nodes (`train.nodes`) each node is such a process, and [`super::nodes`] carries
//! each node's gradient rows to every other. Every node's loop takes the same AdamW step from
//! the same summed gradients, so the nodes stay equal without ever sending weights.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};

use super::nodes::{NodeLink, RunIdentity};
use super::optimizer::AdamW;
use super::step::{apply_grads, lora_params, set_lora_params, shard_grads, Shard, StepOptions, StepStats};
use crate::backend::Backend;
use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::model::CausalLm;
use crate::recipe::Nodes;

/// burn-collective keeps one session per backend type and process, so two data-parallel runs
/// in one process (tests) take turns.
static SESSION: Mutex<()> = Mutex::new(());

/// The replicas besides the training loop's own, with their threads.
pub struct Replicas<B: Backend> {
    workers: Vec<Worker<B>>,
    /// This node's replicas are replicas `first..first + workers + 1` of `count` in all.
    place: Place,
    /// The other nodes, over several.
    link: Option<NodeLink>,
    finished: bool,
    _session: MutexGuard<'static, ()>,
}

/// Where this process's replicas sit among every node's.
#[derive(Debug, Clone, Copy)]
struct Place {
    first: usize,
    count: usize,
}

struct Worker<B: Backend> {
    jobs: Option<Sender<Job<B>>>,
    /// Whether the replica's step went well, once its gradients went into the all-reduce.
    done: Receiver<std::result::Result<(), String>>,
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
    /// elsewhere `load` builds one. With `nodes`, this node then joins the others, which waits
    /// until every node has.
    pub fn start(
        model: &CausalLm<Autodiff<B>>,
        devices: &[B::Device],
        nodes: Option<(&Nodes, &RunIdentity)>,
        load: impl Fn(&B::Device) -> Result<CausalLm<Autodiff<B>>>,
    ) -> Result<Self> {
        let session = SESSION.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // A session an earlier run in this process left half done (an error) is forgotten.
        burn_collective::reset_collective::<B>();
        let local = devices.len();
        let place = match nodes {
            None => Place { first: 0, count: local },
            Some((n, _)) => Place { first: n.rank as usize * local, count: n.count as usize * local },
        };
        let mut workers = Vec::with_capacity(local - 1);
        for (i, device) in devices.iter().enumerate().skip(1) {
            let replica = if *device == devices[0] { model.clone() } else { load(device)? };
            let (jobs, job_rx) = channel();
            let (done_tx, done) = channel();
            let (device, peer) = (device.clone(), place.first + i);
            let thread = std::thread::Builder::new()
                .name(format!("tune-replica-{peer}"))
                .spawn(move || serve(peer, place, local, replica, device, job_rx, done_tx))
                .map_err(|e| Error::Unsupported(format!("train.devices: cannot start replica {peer}: {e}")))?;
            workers.push(Worker { jobs: Some(jobs), done, thread: Some(thread) });
        }
        let mut replicas = Replicas { workers, place, link: None, finished: false, _session: session };
        if local > 1 {
            register::<B>(place.first, local, devices[0].clone())?;
            for (i, w) in replicas.workers.iter().enumerate() {
                w.done.recv().map_err(|_| lost(place.first + i + 1))?.map_err(Error::Unsupported)?;
            }
        }
        if let Some((nodes, run)) = nodes {
            let width = lora_params(model).iter().map(|p| p.dims().iter().product::<usize>()).sum::<usize>() + LOSS_COLUMNS;
            replicas.link = Some(NodeLink::join(nodes, local, width, run)?);
        }
        Ok(replicas)
    }

    /// Over several nodes, each flag ORed over every node (the same answer on each); None on
    /// one node.
    pub fn agree_across_nodes<const N: usize>(&mut self, flags: [bool; N]) -> Result<Option<[bool; N]>> {
        let Some(link) = self.link.as_mut() else { return Ok(None) };
        let all = link.all_gather(&flags.map(|f| if f { 1.0 } else { 0.0 }))?;
        Ok(Some(std::array::from_fn(|i| all.chunks(N).any(|node| node[i] != 0.0))))
    }

    /// Ends the session in order: each replica leaves it, then the training loop's own, the
    /// last of which closes this node's connection to the others.
    pub fn finish(mut self) {
        for w in &mut self.workers {
            w.jobs = None;
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        if !self.workers.is_empty() {
            let _ = burn_collective::finish_collective::<B>(PeerId(self.place.first as u32));
        }
        self.finished = true;
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
        let Place { first, count } = self.place;
        let label_total: usize = batches.iter().map(Batch::label_count).sum();
        let params: Vec<Tensor<B, 2>> = lora_params(model).into_iter().map(|p| p.inner()).collect();
        let shared = Arc::new(batches.to_vec());
        for (i, w) in self.workers.iter().enumerate() {
            let job = Job { params: params.clone(), batches: shared.clone(), label_total, options };
            w.jobs.as_ref().expect("replicas run until dropped").send(job).map_err(|_| lost(first + i + 1))?;
        }
        let local = self.workers.len() + 1;
        let (loss, grads) = shard_grads(model, batches, label_total, options, Shard { index: first, count }, device);
        let (mut rows, shapes) = gradient_rows(0, local, grads, loss);
        if local > 1 {
            rows = all_reduce_local(first, rows)?;
        }
        for (i, w) in self.workers.iter().enumerate() {
            w.done.recv().map_err(|_| lost(first + i + 1))?.map_err(Error::Unsupported)?;
        }
        if let Some(link) = self.link.as_mut() {
            rows = gather_nodes(link, rows, count)?;
        }
        let (grads, loss) = add_rows(rows, &shapes);
        let grad_norm = apply_grads(model, opt, grads, options);
        Ok(StepStats { loss: loss as f32, grad_norm, tokens: batches.iter().map(|b| b.tokens).sum() })
    }
}

impl<B: Backend> Drop for Replicas<B> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
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

fn register<B: Backend>(peer: usize, local: usize, device: B::Device) -> Result<()> {
    let config = CollectiveConfig::default().with_num_devices(local);
    burn_collective::register::<B>(PeerId(peer as u32), device, config)
        .map_err(|e| Error::Unsupported(format!("train.devices: replica {peer} could not join the all-reduce: {e:?}")))
}

/// A replica's thread: a step per job, until the training loop drops its sender.
fn serve<B: Backend>(
    peer: usize,
    place: Place,
    local: usize,
    mut model: CausalLm<Autodiff<B>>,
    device: B::Device,
    jobs: Receiver<Job<B>>,
    done: Sender<std::result::Result<(), String>>,
) {
    if let Err(e) = register::<B>(peer, local, device.clone()) {
        let _ = done.send(Err(e.to_string()));
        return;
    }
    let _ = done.send(Ok(()));
    for job in jobs {
        let shapes: Vec<[usize; 2]> = job.params.iter().map(|p| p.dims()).collect();
        set_lora_params(&mut model, job.params.into_iter().map(|p| Tensor::from_inner(p).require_grad()).collect());
        let shard = Shard { index: peer, count: place.count };
        let step = catch_unwind(AssertUnwindSafe(|| shard_grads(&mut model, &job.batches, job.label_total, job.options, shard, &device)));
        // The other replicas wait in the all-reduce for this one's part: a failed step still
        // takes part (with zeros), and reports the failure.
        let (result, loss, grads) = match step {
            Ok((loss, grads)) => (Ok(()), loss, grads),
            Err(panic) => {
                let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                let zeros = shapes.iter().map(|&s| Tensor::zeros(s, &device)).collect();
                (Err(format!("train.devices: replica {peer} failed: {}", msg.unwrap_or_default())), 0.0, zeros)
            }
        };
        let (rows, _) = gradient_rows(peer - place.first, local, grads, loss);
        let result = all_reduce_local(peer, rows).map(|_| ()).map_err(|e| e.to_string()).and(result);
        if done.send(result).is_err() {
            break;
        }
    }
    let _ = burn_collective::finish_collective::<B>(PeerId(peer as u32));
}

/// A replica's row ends with its loss as two f32s (its f32 rounding and what that left off), so
/// that the step's whole loss travels with the gradients and every node logs it.
const LOSS_COLUMNS: usize = 2;

/// This replica's gradients and loss as row `row` of an `[rows, width]` tensor of zeros (one row
/// for each of this node's replicas), with the gradients' shapes.
///
/// burn-collective adds the peers' tensors in whatever order its hash map yields them, and
/// float addition is not associative: with three or more replicas a plain all-reduce could round
/// differently from one run to the next, and a resumed run would not repeat the uninterrupted
/// one. With a row each, the all-reduce adds only zeros, which is exact in any order, the rows
/// can cross to other nodes as they are, and [`add_rows`] adds them up in replica order. The
/// all-reduce moves `replicas` times the gradients, a small cost for LoRA's.
fn gradient_rows<B: Backend>(row: usize, rows: usize, grads: Vec<Tensor<B, 2>>, loss: f64) -> (Tensor<B, 2>, Vec<[usize; 2]>) {
    let shapes: Vec<[usize; 2]> = grads.iter().map(|g| g.dims()).collect();
    let total: usize = shapes.iter().map(|[r, c]| r * c).sum();
    let device = grads.first().map(|g| g.device()).unwrap_or_default();
    let high = loss as f32;
    let low = (loss - high as f64) as f32;
    let loss_cols = Tensor::<B, 1>::from_floats([high, low], &device).reshape([1, LOSS_COLUMNS]);
    let flat = Tensor::cat(grads.into_iter().map(|g| g.reshape([1, -1])).chain([loss_cols]).collect(), 1);
    let width = total + LOSS_COLUMNS;
    let mut parts = Vec::with_capacity(3);
    if row > 0 {
        parts.push(Tensor::zeros([row, width], &device));
    }
    parts.push(flat);
    if row + 1 < rows {
        parts.push(Tensor::zeros([rows - row - 1, width], &device));
    }
    (Tensor::cat(parts, 0), shapes)
}

/// The rows of every replica on this node, through burn-collective.
fn all_reduce_local<B: Backend>(peer: usize, rows: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
    let reduced = burn_collective::all_reduce::<B>(PeerId(peer as u32), rows.into_primitive().tensor(), ReduceOperation::Sum)
        .map_err(|e| Error::Unsupported(format!("train.devices: the all-reduce failed on replica {peer}: {e:?}")))?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(reduced)))
}

/// Every node's rows (`count` in all, in replica order), given this node's.
fn gather_nodes<B: Backend>(link: &mut NodeLink, rows: Tensor<B, 2>, count: usize) -> Result<Tensor<B, 2>> {
    let [_, width] = rows.dims();
    let device = rows.device();
    let block = rows.into_data().convert::<f32>().to_vec::<f32>().expect("f32 gradients");
    let all = link.all_gather(&block)?;
    Ok(Tensor::from_data(burn::tensor::TensorData::new(all, [count, width]), &device))
}

/// The gradients and the loss: the rows added up in replica order, the same on every replica,
/// every node and in every run.
fn add_rows<B: Backend>(rows: Tensor<B, 2>, shapes: &[[usize; 2]]) -> (Vec<Tensor<B, 2>>, f64) {
    let [count, width] = rows.dims();
    let total = width - LOSS_COLUMNS;
    let losses = rows.clone().narrow(1, total, LOSS_COLUMNS).into_data().convert::<f32>().to_vec::<f32>().expect("f32 losses");
    let loss = losses.chunks(LOSS_COLUMNS).fold(0.0, |sum, hl| sum + (hl[0] as f64 + hl[1] as f64));
    let mut sum = rows.clone().narrow(0, 0, 1);
    for r in 1..count {
        sum = sum + rows.clone().narrow(0, r, 1);
    }
    let mut offset = 0;
    let grads = shapes
        .iter()
        .map(|&shape| {
            let n = shape[0] * shape[1];
            let g = sum.clone().narrow(1, offset, n).reshape(shape);
            offset += n;
            g
        })
        .collect();
    (grads, loss)
}
