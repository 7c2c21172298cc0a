//! `tune bench`: tokens/s and peak memory of the training step `tune run` uses, on random
//! token ids, with LoRA on every linear layer but the head (`all-linear`) and AdamW.

use std::path::Path;
use std::time::Instant;

use crate::backend::Backend;
use burn::backend::Autodiff;
use serde::Serialize;

use crate::adapter::LoraConfig;
use crate::data::batch::{Batch, Row};
use crate::data::examples::Example;
use crate::error::Result;
use crate::model::{self, CausalLm};
use crate::peft;
use crate::rng::Rng;
use crate::train::optimizer::{AdamW, AdamWConfig};
use crate::train::{lora_params, train_step, StepOptions};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub seq: usize,
    pub batch: usize,
    pub rank: usize,
    pub steps: usize,
    pub warmup: usize,
    /// Storage dtype of the frozen base (f32 or bf16).
    pub dtype: burn::tensor::FloatDType,
    /// The decoder linear layers quantized (model.quantize) or not.
    pub quantize: crate::quant::Quantization,
    pub activation_checkpointing: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub seq: usize,
    pub batch: usize,
    pub rank: usize,
    pub steps: usize,
    pub dtype: String,
    pub quantize: String,
    pub activation_checkpointing: bool,
    pub tokens_per_s: f64,
    pub step_s_median: f64,
    pub peak_rss_mib: f64,
    pub load_s: f64,
    /// From the start of the load to the end of the first (warm-up) step: what a user waits
    /// before training runs at speed. On a GPU it includes compiling and autotuning the kernels,
    /// which a warm start finds in tune's caches.
    pub to_first_step_s: f64,
    pub trainable_params: usize,
}

pub fn run<B: Backend>(device: &B::Device, model_dir: &Path, c: &BenchConfig) -> Result<BenchReport> {
    let start = Instant::now();
    let opts = model::LoadOptions { dtype: c.dtype, quantize: c.quantize };
    let mut model: CausalLm<Autodiff<B>> = model::load_with(model_dir, device, &opts)?;
    let load_s = start.elapsed().as_secs_f64();
    let lora = LoraConfig {
        rank: c.rank,
        alpha: 2.0 * c.rank as f64,
        dropout: 0.0,
        target_modules: model.config.linear_names(),
        use_rslora: false,
        use_dora: false,
    };
    peft::inject(&mut model, &lora, 0, device);
    for p in model.linears_mut() {
        if let Some(l) = p.adapter.as_mut() {
            l.a = l.a.clone().require_grad();
        }
    }
    // B starts at zero in a fresh adapter; make it non-zero so every gradient path does work.
    for p in model.linears_mut() {
        if let Some(l) = p.adapter.as_mut() {
            l.b = (l.b.clone() + 1e-3).require_grad();
        }
    }
    let trainable = peft::trainable_parameters(&model);
    let inner: Vec<_> = lora_params(&model).into_iter().map(|p| p.inner()).collect();
    let mut opt = AdamW::new(AdamWConfig::default(), &inner);
    drop(inner);
    let mut rng = Rng::new(1);
    let vocab = model.config.vocab_size;
    let mut times = Vec::new();
    let mut to_first_step_s = 0.0;
    for step in 0..c.warmup + c.steps {
        let rows: Vec<Row> = (0..c.batch)
            .map(|_| {
                let ids: Vec<u32> = (0..c.seq).map(|_| rng.below(vocab) as u32).collect();
                Row::from_example(&Example { trained: vec![true; ids.len()], ids })
            })
            .collect();
        let batch = Batch::new(&rows.iter().collect::<Vec<_>>(), 0);
        let t = Instant::now();
        let options = StepOptions {
            lr: 1e-4,
            max_grad_norm: Some(1.0),
            dropout_seed: step as u64,
            activation_checkpointing: c.activation_checkpointing,
        };
        train_step(&mut model, &mut opt, std::slice::from_ref(&batch), options, device);
        if step == 0 {
            to_first_step_s = start.elapsed().as_secs_f64();
        }
        if step >= c.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let total: f64 = times.iter().sum();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(BenchReport {
        backend: <B as burn::tensor::backend::Backend>::name(device),
        seq: c.seq,
        batch: c.batch,
        rank: c.rank,
        steps: c.steps,
        dtype: format!("{:?}", c.dtype).to_lowercase(),
        quantize: c.quantize.to_string(),
        activation_checkpointing: c.activation_checkpointing,
        tokens_per_s: (c.seq * c.batch * c.steps) as f64 / total,
        step_s_median: sorted[sorted.len() / 2],
        peak_rss_mib: peak_rss_mib(),
        load_s,
        to_first_step_s,
        trainable_params: trainable,
    })
}

/// Peak resident set size of this process (VmHWM), in MiB; 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
