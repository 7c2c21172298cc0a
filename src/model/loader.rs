//! Builds model tensors from safetensors by HF name, checking each shape, and afterwards that no
//! tensor in the files was left unused (a sign of a wrong family or a wrong name table).

use std::cell::RefCell;
use std::collections::BTreeSet;

use crate::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};

use super::blocks::Norm;
use super::config::{NormKind, WeightLayout};
use super::linear::{FrozenWeight, Linear};
use crate::error::{Error, Result};
use crate::hf::Weights;
use crate::quant::Quantization;

pub struct Loader<'a, B: Backend> {
    weights: &'a Weights,
    device: B::Device,
    /// Storage dtype of the large frozen matrices (projections, embeddings, lm_head); norms and
    /// biases stay f32.
    matrix_dtype: FloatDType,
    /// How the decoder's linear layers are stored (embeddings, norms and the head never are).
    quantize: Quantization,
    /// A prefix some checkpoints were saved without (`transformer.` of GPT-2 and BLOOM).
    optional_prefix: Option<&'static str>,
    used: RefCell<BTreeSet<String>>,
}

impl<'a, B: Backend> Loader<'a, B> {
    pub fn new(weights: &'a Weights, device: B::Device) -> Self {
        Loader {
            weights,
            device,
            matrix_dtype: FloatDType::F32,
            quantize: Quantization::None,
            optional_prefix: None,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// Stores every [`Loader::linear`] quantized, each as soon as it is read: loading holds the
    /// quantized layers so far and one f32 tensor, never the f32 model.
    pub fn with_quantization(mut self, quantize: Quantization) -> Self {
        self.quantize = quantize;
        self
    }

    /// Stores the frozen matrices in `dtype` (bf16 halves their memory; compute casts at use).
    pub fn with_matrix_dtype(mut self, dtype: FloatDType) -> Self {
        self.matrix_dtype = dtype;
        self
    }

    /// Reads `transformer.x` from a file that holds `x` when the file lacks the prefix.
    pub fn with_optional_prefix(mut self, prefix: Option<&'static str>) -> Self {
        self.optional_prefix = prefix;
        self
    }

    /// The name as the files hold it.
    fn stored(&self, name: &str) -> String {
        if let Some(short) = self.optional_prefix.and_then(|p| name.strip_prefix(p)) {
            if !self.weights.contains(name) && self.weights.contains(short) {
                return short.to_string();
            }
        }
        name.to_string()
    }

    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.weights.read_f32(&self.mark_used(name), shape)
    }

    fn mark_used(&self, name: &str) -> String {
        let name = self.stored(name);
        self.used.borrow_mut().insert(name.clone());
        name
    }

    /// A frozen matrix `[rows, cols]` as stored, in the matrix dtype. A bf16 one is read
    /// straight into bf16: never a whole f32 tensor, and a bf16 file is only copied.
    fn stored_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<B, 2>> {
        let data = match self.matrix_dtype {
            FloatDType::BF16 => TensorData::new(self.weights.read_bf16(&self.mark_used(name), &[rows, cols])?, [rows, cols]),
            _ => TensorData::new(self.read(name, &[rows, cols])?, [rows, cols]),
        };
        Ok(Tensor::from_data(data, (&self.device, DType::from(self.matrix_dtype))))
    }

    pub fn vector(&self, name: &str, n: usize) -> Result<Tensor<B, 1>> {
        let data = self.read(name, &[n])?;
        Ok(Tensor::from_data(TensorData::new(data, [n]), &self.device))
    }

    /// A matrix stored as HF stores it, [rows, cols].
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<B, 2>> {
        self.stored_matrix(name, rows, cols)
    }

    /// A decoder's linear layer at module path `name`, quantized when the loader is (see
    /// [`Loader::with_quantization`]), else as [`Loader::dense_weight`] reads it.
    pub fn linear(&self, name: &str, in_features: usize, out_features: usize, bias: bool, layout: WeightLayout) -> Result<Linear<B>> {
        let weight = match self.quantize {
            Quantization::None => FrozenWeight::Dense(self.dense_weight(name, in_features, out_features, layout)?),
            q => {
                // bitsandbytes quantizes [out, in]: an nn.Linear's weight as stored, a Conv1D's
                // transposed.
                let w = match layout {
                    WeightLayout::OutIn => self.read(&format!("{name}.weight"), &[out_features, in_features])?,
                    WeightLayout::InOut => crate::adapter::transpose(
                        &self.read(&format!("{name}.weight"), &[in_features, out_features])?,
                        in_features,
                        out_features,
                    ),
                };
                FrozenWeight::Quantized(std::sync::Arc::new(q.quantize(&w, out_features, in_features).expect("a quantization")))
            }
        };
        let bias = if bias { Some(self.vector(&format!("{name}.bias"), out_features)?) } else { None };
        Ok(Linear { name: name.to_string(), weight, bias, layout, adapter: None })
    }

    /// The weight of the linear layer at module path `name` as a dense `[in, out]` tensor in the
    /// matrix dtype, whatever the quantization (the output head's). An `nn.Linear`'s `[out, in]`
    /// f32 weight is transposed while converting, so the only copy in memory is the [in, out]
    /// one (what the f32 gemm calls read fastest); a bf16 one stays as stored and is used as a
    /// transposed view, since the bf16 kernel reads its operand either way (no transpose at
    /// load). A `Conv1D`'s is already [in, out].
    pub fn dense_weight(&self, name: &str, in_features: usize, out_features: usize, layout: WeightLayout) -> Result<Tensor<B, 2>> {
        let weight_name = format!("{name}.weight");
        Ok(match (layout, self.matrix_dtype) {
            (WeightLayout::OutIn, FloatDType::BF16) => self.stored_matrix(&weight_name, out_features, in_features)?.transpose(),
            (WeightLayout::InOut, _) => self.stored_matrix(&weight_name, in_features, out_features)?,
            (WeightLayout::OutIn, dtype) => {
                let w = self.read(&weight_name, &[out_features, in_features])?;
                let mut t = vec![0f32; w.len()];
                for (o, row) in w.chunks_exact(in_features).enumerate() {
                    for (i, &v) in row.iter().enumerate() {
                        t[i * out_features + o] = v;
                    }
                }
                Tensor::from_data(TensorData::new(t, [in_features, out_features]), (&self.device, DType::from(dtype)))
            }
        })
    }

    /// A norm at module path `name` over `n` features: RMSNorm's weight (Gemma's stored w
    /// becomes 1 + w, in f32 as transformers computes it), or LayerNorm's weight and bias.
    pub fn norm(&self, name: &str, n: usize, kind: NormKind) -> Result<Norm<B>> {
        let weight = self.read(&format!("{name}.weight"), &[n])?;
        match kind {
            NormKind::Rms { eps, unit_offset } => {
                let weight = if unit_offset { weight.iter().map(|w| 1.0 + w).collect() } else { weight };
                Ok(Norm::Rms { weight: Tensor::from_data(TensorData::new(weight, [n]), &self.device), eps })
            }
            NormKind::Layer { eps } => Ok(Norm::Layer {
                weight: Tensor::from_data(TensorData::new(weight, [n]), &self.device),
                bias: self.vector(&format!("{name}.bias"), n)?,
                eps,
            }),
        }
    }

    /// Fails on any tensor in the files the model did not ask for.
    pub fn finish(&self) -> Result<()> {
        let used = self.used.borrow();
        let unexpected: Vec<&str> = self.weights.names().filter(|n| !used.contains(*n) && !ignorable(n)).collect();
        if let Some(first) = unexpected.first() {
            return Err(Error::Tensor {
                path: self.weights.path_of(first),
                name: first.to_string(),
                msg: format!(
                    "unexpected tensor ({} unused in all{}); the checkpoint does not match its config.json (model_type or sizes)",
                    unexpected.len(),
                    if unexpected.len() > 1 { format!(", e.g. also `{}`", unexpected[1]) } else { String::new() }
                ),
            });
        }
        Ok(())
    }
}

/// Tensors some exporters write that carry nothing the model needs: precomputed rotary
/// frequencies, GPT-2's and GPT-NeoX's causal-mask buffers, and lm_head when it is tied to the
/// embeddings (a copy of them).
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with(".attention.bias")
        || name.ends_with(".attention.masked_bias")
        || name == "lm_head.weight"
}
