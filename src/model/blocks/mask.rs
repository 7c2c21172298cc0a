//! Which keys each query may attend to, before any sliding window (each layer applies its own
//! window, see `AttentionOptions::window`).

use burn::tensor::{Bool, Tensor, TensorData};

use crate::backend::Backend;

#[derive(Debug, Clone)]
pub enum AttentionMask<B: Backend> {
    /// Plain causal attention, aligned at the bottom right (a query sees every cached key).
    Causal,
    /// An explicit mask, `[batch, 1, q, k]`, `true` where attention is NOT allowed: packed rows
    /// (block-diagonal causal).
    Explicit(Tensor<B, 4, Bool>),
}

impl<B: Backend> AttentionMask<B> {
    /// The mask for rows of packed examples: `segments[r]` lists the example lengths of row r
    /// (their sum is the row length). A query sees keys of its own example at or before it.
    pub fn packed(segments: &[Vec<usize>], seq: usize, device: &B::Device) -> Self {
        let mut data = Vec::with_capacity(segments.len() * seq * seq);
        for row in segments {
            let mut example = Vec::with_capacity(seq);
            for (i, &len) in row.iter().enumerate() {
                example.extend(std::iter::repeat_n(i, len));
            }
            // Padding after the last example is its own segment (it attends only to itself).
            while example.len() < seq {
                example.push(usize::MAX - example.len());
            }
            for q in 0..seq {
                for k in 0..seq {
                    data.push(!(k <= q && example[k] == example[q]));
                }
            }
        }
        AttentionMask::Explicit(Tensor::from_data(TensorData::new(data, [segments.len(), 1, seq, seq]), device))
    }

    pub(crate) fn to_ops(&self) -> crate::ops::Mask<B> {
        match self {
            AttentionMask::Causal => crate::ops::Mask::Causal,
            AttentionMask::Explicit(m) => crate::ops::Mask::Explicit(m.clone().into_primitive()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_mask_is_block_diagonal_causal() {
        let device = Default::default();
        let AttentionMask::Explicit(m) = AttentionMask::<crate::backend::Cpu>::packed(&[vec![2, 2]], 4, &device) else {
            panic!("packed masks are explicit")
        };
        let masked: Vec<bool> = m.into_data().iter::<bool>().collect();
        #[rustfmt::skip]
        let expect = [
            false, true,  true,  true,
            false, false, true,  true,
            true,  true,  false, true,
            true,  true,  false, false,
        ];
        assert_eq!(masked, expect);
    }
}
