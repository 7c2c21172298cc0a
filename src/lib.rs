//! tune: LoRA fine-tuning for open-weight LLMs.
//!
//! Data flows one way: Hugging Face files (`hf`) -> model (`model`, `lora`; a quantized base's
//! codecs in `quant`) -> data (`data`) -> evaluation and generation (`eval`, `generate`); ggml's codecs and
//! llama-quantize's q4_k_m mix for GGUF export in `gguf`.

pub mod adapter;
pub mod backend;
pub mod bench;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod fsutil;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod model;
pub mod ops;
pub mod peft;
pub mod quant;
pub mod recipe;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
