//! The blocks every family is built from, each a small set of variants chosen by the family's
//! config (see `model::config`): norms, positions, attention, MLP, and the decoder block that
//! joins them to the residual stream.

pub mod attention;
pub mod block;
pub mod mask;
pub mod mlp;
pub mod norm;
pub mod positions;

pub use attention::{Attention, Qkv};
pub use block::Block;
pub use mask::AttentionMask;
pub use mlp::Mlp;
pub use norm::Norm;
pub use positions::{alibi_slopes, Rope, RopeTables};

use crate::backend::Backend;
use burn::tensor::Tensor;

/// What every block of one forward pass shares: the number of rows, the rotary tables (one per
/// table of the model) and the mask.
pub struct Context<'a, B: Backend> {
    pub rows: usize,
    pub ropes: &'a [RopeTables<B>],
    pub mask: &'a AttentionMask<B>,
}

/// One layer's cached keys and values, `[b, t, kv_heads, d]`.
pub type KvSlot<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;
