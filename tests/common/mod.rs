//! Helpers shared by the integration tests: fixture paths and reading reference tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

pub type B = tune::backend::Cpu;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny(name: &str) -> PathBuf {
    fixtures().join("tiny").join(name)
}

/// The tiny random checkpoints, one per family variant.
pub const TINY: &[&str] =
    &["llama", "llama-tied", "llama-linear", "mistral", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "gpt2", "gpt-neox", "bloom"];

/// A reference tensor written by tests/fixtures/reference.py: values widened to f64 plus its shape.
#[derive(Debug, Clone)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl RefTensor {
    pub fn ids(&self) -> Vec<u32> {
        self.values.iter().map(|&v| v as u32).collect()
    }
    pub fn f32s(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }
    pub fn scalar(&self) -> f64 {
        assert_eq!(self.values.len(), 1, "not a scalar: {:?}", self.shape);
        self.values[0]
    }
}

pub fn read_reference(path: &Path) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
                Dtype::F64 => data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
                Dtype::I64 => data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
                Dtype::I32 => data.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, RefTensor { shape: view.shape().to_vec(), values })
        })
        .collect()
}

/// max |a - b| and max |b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| (*y as f64).abs()).fold(0.0, f64::max);
    (diff, scale)
}

/// Location of the real SmolLM2-135M-Instruct: $TUNE_SMOLLM2 or the project script's default.
pub fn smollm2_dir() -> PathBuf {
    if let Ok(p) = std::env::var("TUNE_SMOLLM2") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let models = std::env::var("TUNE_MODELS").unwrap_or_else(|_| format!("{home}/.cache/tune/models"));
    PathBuf::from(models).join("smollm2-135m-instruct")
}

/// The real Gemma 3 270M: $TUNE_GEMMA3 or scripts/fetch-gemma3.sh's default.
pub fn gemma3_dir() -> PathBuf {
    if let Ok(p) = std::env::var("TUNE_GEMMA3") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let models = std::env::var("TUNE_MODELS").unwrap_or_else(|_| format!("{home}/.cache/tune/models"));
    PathBuf::from(models).join("gemma3-270m")
}

/// A real model directory a test needs. Such tests are `#[ignore]`d (so a plain `cargo test`
/// does not claim them passed), and scripts/test.sh fetches the models and runs them with
/// `--include-ignored`: then a missing model fails the test.
pub fn require_model(dir: PathBuf, script: &str) -> PathBuf {
    assert!(dir.join("model.safetensors").is_file(), "no model at {} (run {script})", dir.display());
    dir
}

/// A JSON fixture, `tests/fixtures/<path>`.
pub fn json(path: &str) -> serde_json::Value {
    let p = fixtures().join(path);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// A real model against what tests/fixtures/<dir>/ holds from transformers: the token ids and
/// the mean next-token loss of eval.jsonl (1e-4 relative), and the logits at the first and last
/// position of logits.safetensors' input (1e-4 of the largest).
pub fn check_eval_loss_and_logits(model: &tune::model::CausalLm<B>, tok: &tune::hf::Tokenizer, dir: &str) {
    let device = Default::default();
    let reference = json(&format!("{dir}/eval_reference.json"));
    let records = tune::data::read_records(&fixtures().join(dir).join("eval.jsonl")).unwrap();
    let eos = tok.eos_token_id();
    let sequences: Vec<Vec<u32>> =
        records.iter().map(|r| tune::data::text_ids(tok, r.value["text"].as_str().unwrap(), eos).unwrap()).collect();
    for (i, (seq, want)) in sequences.iter().zip(reference["ids"].as_array().unwrap()).enumerate() {
        assert_eq!(seq, &ids(want), "{dir}: token ids of line {}", i + 1);
    }
    let report = tune::eval::evaluate(model, &sequences, &device);
    let want = reference["loss"].as_f64().unwrap();
    assert_eq!(report.tokens as u64, reference["tokens"].as_u64().unwrap());
    let rel = (report.loss - want).abs() / want;
    eprintln!("{dir}: eval loss {} vs transformers {want} (rel {rel:.2e})", report.loss);
    assert!(rel <= 1e-4, "{dir}: eval loss {} vs transformers {want}", report.loss);

    let r = read_reference(&fixtures().join(dir).join("logits.safetensors"));
    let input = r["input_ids"].ids();
    let positions: Vec<usize> = (0..input.len()).collect();
    let hidden =
        model.forward_hidden(tune::model::token_tensor::<B>(&input, 1, &device), &positions, &tune::model::AttentionMask::Causal, None);
    let logits: Vec<f32> = model.lm_head(hidden).into_data().iter::<f32>().collect();
    let vocab = model.config.vocab_size;
    for (key, pos) in [("logits_first", 0), ("logits_last", input.len() - 1)] {
        let (d, s) = max_abs_diff(&logits[pos * vocab..(pos + 1) * vocab], &r[key].f32s());
        eprintln!("{dir}: {key}: max |Δ| {d:.2e} of max |logit| {s:.1}");
        assert!(d / s <= 1e-4, "{dir}: {key}: max |Δlogit| {d} vs scale {s}");
    }
}

/// Writes a tiny random Llama (hidden 32, 2 layers, GQA, vocab 32) with the hand-written test
/// tokenizer of tests/fixtures/tokenizer into `dir`, for tests that run `tune` end to end fast.
pub fn write_tiny_model(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut rng = tune::rng::Rng::new(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, ones: bool, rng: &mut tune::rng::Rng| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| if ones { 1.0 } else { ((rng.next_f64() * 2.0 - 1.0) * 0.3) as f32 }).collect();
        tensors.push((name, shape, data.iter().flat_map(|x| x.to_le_bytes()).collect()));
    };
    add("model.embed_tokens.weight".into(), vec![32, 32], false, &mut rng);
    add("model.norm.weight".into(), vec![32], true, &mut rng);
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("self_attn.q_proj", vec![32, 32]),
            ("self_attn.k_proj", vec![16, 32]),
            ("self_attn.v_proj", vec![16, 32]),
            ("self_attn.o_proj", vec![32, 32]),
            ("mlp.gate_proj", vec![64, 32]),
            ("mlp.up_proj", vec![64, 32]),
            ("mlp.down_proj", vec![32, 64]),
        ] {
            add(format!("{p}.{n}.weight"), shape, false, &mut rng);
        }
        add(format!("{p}.input_layernorm.weight"), vec![32], true, &mut rng);
        add(format!("{p}.post_attention_layernorm.weight"), vec![32], true, &mut rng);
    }
    let views: Vec<(&str, safetensors::tensor::TensorView)> =
        tensors.iter().map(|(n, s, b)| (n.as_str(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors")).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tokenizer").join(f), dir.join(f)).unwrap();
    }
}

/// `n` seeded text records over the test tokenizer's alphabet, as JSON lines.
pub fn write_text_dataset(path: &Path, n: usize, seed: u64) {
    let words = ["hello", "world", "hold", "lord", "herd", "roll", "wheel", "door", "red", "owl"];
    let mut rng = tune::rng::Rng::new(seed);
    let lines: Vec<String> = (0..n)
        .map(|_| {
            let k = 2 + rng.below(6);
            let text: Vec<&str> = (0..k).map(|_| words[rng.below(words.len())]).collect();
            serde_json::json!({ "text": text.join(" ") }).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Runs the `tune` binary from the repository root; returns its exit code and stderr, and
/// fails the test if it panicked (bad input must be an error message, never a panic).
pub fn tune(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tune")).current_dir(env!("CARGO_MANIFEST_DIR")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "tune panicked: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
