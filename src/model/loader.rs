//! Builds model tensors from safetensors by HF name, checking each shape, and afterwards that no
//! tensor in the files was left unused (a sign of a wrong family or a wrong name table).

use std::cell::RefCell;
use std::collections::BTreeSet;

use crate::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};

use super::layers::Projection;
use crate::error::{Error, Result};
use crate::hf::Weights;

pub struct Loader<'a, B: Backend> {
    weights: &'a Weights,
    device: B::Device,
    /// Storage dtype of the large frozen matrices (projections, embeddings, lm_head); norms and
    /// biases stay f32.
    matrix_dtype: FloatDType,
    used: RefCell<BTreeSet<String>>,
}

impl<'a, B: Backend> Loader<'a, B> {
    pub fn new(weights: &'a Weights, device: B::Device) -> Self {
        Loader {
            weights,
            device,
            matrix_dtype: FloatDType::F32,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// Stores the frozen matrices in `dtype` (bf16 halves their memory; compute casts at use).
    pub fn with_matrix_dtype(mut self, dtype: FloatDType) -> Self {
        self.matrix_dtype = dtype;
        self
    }

    fn matrix_tensor(&self, data: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(data, shape), (&self.device, DType::from(self.matrix_dtype)))
    }

    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.used.borrow_mut().insert(name.to_string());
        self.weights.read_f32(name, shape)
    }

    pub fn vector(&self, name: &str, n: usize) -> Result<Tensor<B, 1>> {
        let data = self.read(name, &[n])?;
        Ok(Tensor::from_data(TensorData::new(data, [n]), &self.device))
    }

    /// A matrix stored as HF stores it, [rows, cols].
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<B, 2>> {
        let data = self.read(name, &[rows, cols])?;
        Ok(self.matrix_tensor(data, [rows, cols]))
    }

    /// An `nn.Linear(in, out)` at module path `name`: HF's `[out, in]` weight is transposed
    /// while converting, so the only copy in memory is the [in, out] one.
    pub fn projection(&self, name: &str, in_features: usize, out_features: usize, bias: bool) -> Result<Projection<B>> {
        let w = self.read(&format!("{name}.weight"), &[out_features, in_features])?;
        let mut t = vec![0f32; w.len()];
        for (o, row) in w.chunks_exact(in_features).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                t[i * out_features + o] = v;
            }
        }
        drop(w);
        let weight = self.matrix_tensor(t, [in_features, out_features]);
        let bias = if bias {
            Some(self.vector(&format!("{name}.bias"), out_features)?)
        } else {
            None
        };
        Ok(Projection {
            name: name.to_string(),
            weight,
            bias,
            lora: None,
        })
    }

    /// Fails on any tensor in the files the model did not ask for.
    pub fn finish(&self) -> Result<()> {
        let used = self.used.borrow();
        let unexpected: Vec<&str> = self
            .weights
            .names()
            .filter(|n| !used.contains(*n) && !ignorable(n))
            .collect();
        if let Some(first) = unexpected.first() {
            return Err(Error::Tensor {
                path: self.weights.path_of(first),
                name: first.to_string(),
                msg: format!(
                    "unexpected tensor ({} unused in all{}); the checkpoint does not match its config.json (model_type or sizes)",
                    unexpected.len(),
                    if unexpected.len() > 1 {
                        format!(", e.g. also `{}`", unexpected[1])
                    } else {
                        String::new()
                    }
                ),
            });
        }
        Ok(())
    }
}

/// Tensors some exporters write that carry nothing the model needs: precomputed rotary
/// frequencies, and lm_head when it is tied to the embeddings (a copy of them).
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq") || name == "lm_head.weight"
}
