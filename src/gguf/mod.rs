//! GGUF export: ggml's quantized block codecs ([`quants`]) and llama-quantize's per-tensor type
//! choice for a q4_k_m file ([`mix`]).

pub mod mix;
pub mod quants;

/// ggml's tensor types (`enum ggml_type`), with ggml's numbering: the value is what a GGUF
/// tensor-info record stores.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    IQ4_NL = 20,
    BF16 = 30,
}

impl GgmlType {
    /// Values per block (ggml's `blck_size`): 1 for the float types, 32 for the legacy quants
    /// and IQ4_NL, 256 (`QK_K`) for the k-quants.
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | IQ4_NL => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K => 256,
        }
    }

    /// Bytes per block (ggml's `type_size`, the `sizeof` of its `block_*` struct).
    pub fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 | BF16 => 2,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            IQ4_NL => 18,
        }
    }

    /// Bytes of a row of `n` values (ggml's `ggml_row_size`); `n` must be a multiple of
    /// [`block_size`](Self::block_size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }

    /// ggml's name for the type (`ggml_type_name`): "f32", "q4_K", ...
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q2_K => "q2_K",
            Q3_K => "q3_K",
            Q4_K => "q4_K",
            Q5_K => "q5_K",
            Q6_K => "q6_K",
            IQ4_NL => "iq4_nl",
            BF16 => "bf16",
        }
    }
}
