//! ggml's block quantizers.
//!
//! Stand-in, replaced by the k-quants branch: Q8_0 only, as ggml's `quantize_row_q8_0_ref`
//! computes it; every other block type is refused.

use super::GgmlType;
use crate::error::{Error, Result};

/// Appends the blocks of `x` (a multiple of `t.block_size()` values) encoded as `t`.
pub fn quantize_row(t: GgmlType, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    if !x.len().is_multiple_of(t.block_size()) {
        return Err(Error::Unsupported(format!("{} values do not fill {} blocks of {}", x.len(), t.name(), t.block_size())));
    }
    match t {
        GgmlType::Q8_0 => {
            for block in x.chunks_exact(32) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(super::f16_bits(d).to_le_bytes());
                // roundf: halves away from zero.
                out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
            }
            Ok(())
        }
        other => Err(Error::Unsupported(format!("quantizing to {} is not available in this build", other.name()))),
    }
}
