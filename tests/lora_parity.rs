//! LoRA against PEFT on the tiny checkpoints (references from tests/fixtures/reference.py):
//! the loss and every lora_A/lora_B gradient of one masked batch, and 5 steps of
//! torch.optim.AdamW (lr 1e-2, weight decay 0.01, global-norm clipping at 1.0).
//! Tolerance: 1e-4 relative (loss and grad norm: to the value; gradients: to the tensor's max
//! |value|); adapter weights after 5 steps: ‖Δ‖/‖w‖ ≤ 1e-3 (see below).

mod common;

use burn::backend::Autodiff;
use burn::tensor::Tensor;
use common::*;
use tune::data::batch::{pack, Batch, Row};
use tune::data::examples::Example;
use tune::model::{self, CausalLm};
use tune::peft;
use tune::train::optimizer::{AdamW, AdamWConfig};
use tune::train::{batch_loss, lora_params, loss_and_grads, loss_for_backward, train_step, StepOptions};

type AB = Autodiff<B>;
const TOL: f64 = 1e-4;

fn model_with_adapter(name: &str, variant: &str) -> CausalLm<AB> {
    let device = Default::default();
    let mut m: CausalLm<AB> = model::load(&tiny(name), &device).unwrap();
    peft::load_peft(&mut m, &tiny(name).join(variant).join("adapter"), &device).unwrap();
    for p in m.linears_mut() {
        if let Some(l) = p.adapter.as_mut() {
            l.a = l.a.clone().require_grad();
            l.b = l.b.clone().require_grad();
        }
    }
    m
}

/// The reference batch: labels of -100 are prompt tokens (not trained on).
fn reference_batch(reference: &std::collections::HashMap<String, RefTensor>) -> Batch {
    let ids = reference["input_ids"].ids();
    let labels = &reference["labels"].values;
    let seq = reference["input_ids"].shape[1];
    let rows: Vec<Row> = ids
        .chunks(seq)
        .zip(labels.chunks(seq))
        .map(|(ids, labels)| Row::from_example(&Example { ids: ids.to_vec(), trained: labels.iter().map(|&l| l != -100.0).collect() }))
        .collect();
    Batch::new(&rows.iter().collect::<Vec<_>>(), 0)
}

/// Our tensors are stored transposed ([in, r] and [r, out]); PEFT's are [r, in] and [out, r].
fn peft_layout(t: Tensor<B, 2>) -> Vec<f32> {
    t.transpose().into_data().iter::<f32>().collect()
}

fn frobenius_rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (d, s) = max_abs_diff(a, b);
    d / s.max(1e-12)
}

fn check_loss_and_grads(name: &str, variant: &str) {
    let reference = read_reference(&tiny(name).join(variant).join("reference.safetensors"));
    let model = model_with_adapter(name, variant);
    let device = Default::default();
    let batch = reference_batch(&reference);
    // The loss as the graph computes it, and the gradient through the chunked lm_head +
    // cross-entropy that training uses.
    let value: f32 = batch_loss(&model, &batch, batch.label_count(), &device).into_scalar();
    let (surrogate, chunked) = loss_for_backward(&model, &batch, batch.label_count(), &device);
    assert!((chunked - value as f64).abs() <= 1e-6 * value as f64, "{name}/{variant}: chunked loss {chunked} vs {value}");
    let ref_loss = reference["loss"].scalar();
    let loss_err = (value as f64 - ref_loss).abs() / ref_loss;
    assert!(loss_err <= TOL, "{name}/{variant}: loss {value} vs PEFT {ref_loss} (rel {loss_err:.2e})");
    let grads = surrogate.backward();
    let mut worst = 0f64;
    let mut checked = 0;
    for p in model.linears() {
        let Some(l) = &p.adapter else { continue };
        for (which, t) in [("lora_A", &l.a), ("lora_B", &l.b)] {
            let key = format!("grad.{}", peft::peft_key(&p.name, which));
            let ours = peft_layout(t.grad(&grads).expect("adapter tensors have gradients"));
            let err = rel(&ours, &reference[&key].f32s());
            worst = worst.max(err);
            assert!(err <= TOL, "{name}/{variant}: {key} relative error {err:.2e}");
            checked += 1;
        }
    }
    let expected = reference.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, expected, "{name}/{variant}: every PEFT gradient is compared");

    // Activation checkpointing recomputes each layer: the same loss and gradients as PEFT's.
    let (loss, recomputed) = loss_and_grads(&model, &batch, batch.label_count(), true, &device);
    assert!((loss - chunked).abs() <= 1e-6 * chunked, "{name}/{variant}: checkpointed loss {loss} vs {chunked}");
    let mut recomputed = recomputed.into_iter();
    for p in model.linears().into_iter().filter(|p| p.adapter.is_some()) {
        for which in ["lora_A", "lora_B"] {
            let key = format!("grad.{}", peft::peft_key(&p.name, which));
            let ours = peft_layout(recomputed.next().expect("one gradient per adapter tensor"));
            let err = rel(&ours, &reference[&key].f32s());
            assert!(err <= TOL, "{name}/{variant}: checkpointed {key} relative error {err:.2e}");
        }
    }
    assert!(recomputed.next().is_none(), "{name}/{variant}: no extra gradients");
    eprintln!("{name:14}{variant:14} loss rel err {loss_err:.2e}, worst grad rel err {worst:.2e} over {checked} tensors");
}

#[test]
fn loss_and_gradients_match_peft() {
    for name in TINY {
        check_loss_and_grads(name, "lora");
    }
    check_loss_and_grads("llama-tied", "lora-rslora");
}

#[test]
fn five_adamw_steps_match_torch() {
    let device = Default::default();
    for name in TINY {
        let reference = read_reference(&tiny(name).join("lora").join("reference.safetensors"));
        let mut model = model_with_adapter(name, "lora");
        let batch = reference_batch(&reference);
        let config = AdamWConfig { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.01 };
        let inner: Vec<_> = lora_params(&model).into_iter().map(|p| p.inner()).collect();
        let mut opt = AdamW::new(config, &inner);
        let ref_losses = reference["adam_losses"].values.clone();
        let ref_norms = reference["adam_grad_norms"].values.clone();
        for step in 0..5 {
            let options = StepOptions { lr: 1e-2, max_grad_norm: Some(1.0), dropout_seed: 0, activation_checkpointing: false };
            let stats = train_step(&mut model, &mut opt, std::slice::from_ref(&batch), options, &device);
            let loss_err = (stats.loss as f64 - ref_losses[step]).abs() / ref_losses[step];
            let norm_err = (stats.grad_norm - ref_norms[step]).abs() / ref_norms[step];
            assert!(loss_err <= TOL, "{name} step {}: loss {} vs torch {} (rel {loss_err:.2e})", step + 1, stats.loss, ref_losses[step]);
            assert!(norm_err <= TOL, "{name} step {}: grad norm {} vs torch {}", step + 1, stats.grad_norm, ref_norms[step]);
        }
        // The losses must move, or this test would pass with a no-op optimizer.
        assert!((ref_losses[4] - ref_losses[0]).abs() > 1e-3, "{name}: reference losses barely change");
        for p in model.linears() {
            let Some(l) = &p.adapter else { continue };
            for (which, t) in [("lora_A", &l.a), ("lora_B", &l.b)] {
                let key = format!("final.{}", peft::peft_key(&p.name, which));
                // Adam's first update is lr·g/(|g| + 1e-8): for a gradient element near 1e-8
                // (mistral's layers.1 down_proj lora_A has one of 1.3e-8) f32 rounding noise of
                // that size changes the element's step by a good fraction of lr. So the weights
                // are compared as a whole, to 1e-3; the losses above hold to 1e-4.
                let (ours, want) = (peft_layout(t.clone().inner()), reference[&key].f32s());
                let err = frobenius_rel(&ours, &want);
                assert!(err <= 1e-3, "{name}: {key} after 5 steps, ‖Δ‖/‖w‖ = {err:.2e}");
            }
        }
    }
}

/// Training with `train.activation_checkpointing` follows the plain run: LoRA dropout (the
/// recomputed forward pass must draw the same masks), packed rows, and two micro-batches of
/// gradient accumulation, over three AdamW steps.
#[test]
fn activation_checkpointing_trains_like_the_plain_step() {
    let device = Default::default();
    for name in TINY {
        let reference = read_reference(&tiny(name).join("lora").join("reference.safetensors"));
        let ids = reference["input_ids"].ids();
        let vocab = *ids.iter().max().unwrap() as usize + 1;
        // Examples of different lengths, packed two or three to a row.
        let examples: Vec<Example> = (0..6)
            .map(|i| {
                let len = 5 + 3 * i;
                let ids: Vec<u32> = (0..len).map(|j| ((j * 7 + i * 13) % vocab) as u32).collect();
                Example { trained: (0..len).map(|j| j >= 2).collect(), ids }
            })
            .collect();
        let rows = pack(&examples, 24);
        assert!(rows.iter().any(|r| r.segments.len() > 1), "the rows are packed");
        let half = rows.len() / 2;
        let micro = [Batch::new(&rows[..half].iter().collect::<Vec<_>>(), 0), Batch::new(&rows[half..].iter().collect::<Vec<_>>(), 0)];
        let run = |checkpointing: bool| {
            let mut model = model_with_adapter(name, "lora");
            for p in model.linears_mut() {
                if let Some(l) = p.adapter.as_mut() {
                    l.dropout = 0.1;
                }
            }
            let inner: Vec<_> = lora_params(&model).into_iter().map(|p| p.inner()).collect();
            let mut opt = AdamW::new(AdamWConfig::default(), &inner);
            let mut losses = Vec::new();
            for step in 0..3 {
                let options =
                    StepOptions { lr: 1e-2, max_grad_norm: Some(1.0), dropout_seed: step, activation_checkpointing: checkpointing };
                let stats = train_step(&mut model, &mut opt, &micro, options, &device);
                losses.push((stats.loss, stats.grad_norm));
            }
            let weights: Vec<Vec<f32>> = lora_params(&model).into_iter().map(|p| p.inner().into_data().iter::<f32>().collect()).collect();
            (losses, weights)
        };
        let (plain_losses, plain) = run(false);
        let (ckpt_losses, ckpt) = run(true);
        for (step, ((l0, n0), (l1, n1))) in plain_losses.iter().zip(&ckpt_losses).enumerate() {
            assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "{name} step {}: loss {l1} vs {l0}", step + 1);
            assert!((n0 - n1).abs() <= 1e-6 * n0.abs(), "{name} step {}: grad norm {n1} vs {n0}", step + 1);
        }
        // Dropout is on, so a recomputation with other masks would move these.
        assert!((plain_losses[2].0 - plain_losses[0].0).abs() > 1e-4, "{name}: training moves the loss");
        for (i, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
            let err = frobenius_rel(b, a);
            assert!(err <= 1e-6, "{name}: adapter tensor {i} after 3 steps, ‖Δ‖/‖w‖ = {err:.2e}");
        }
    }
}
