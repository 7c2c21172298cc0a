//! Everything read from a Hugging Face model directory: config.json, safetensors weights,
//! tokenizer.json (and SentencePiece's tokenizer.model, for GGUF vocabularies) and the chat
//! template (and the chat template an adapter carries).

pub mod adapter_template;
pub mod chat_template;
pub mod config;
pub mod safetensors;
pub mod sentencepiece;
pub mod tokenizer;

pub use chat_template::{ChatDate, ChatTemplate, Message};
pub use config::{GenerationConfig, RawConfig};
pub use safetensors::Weights;
pub use tokenizer::Tokenizer;
