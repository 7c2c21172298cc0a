//! `tune export --gguf / --gguf-adapter / --ollama` against llama.cpp's own converters:
//! tests/fixtures/gguf_reference.py ran convert_hf_to_gguf.py (f32 and f16; bf16 and q8_0 for
//! llama and gemma3) on every tiny
//! family checkpoint with the test tokenizer, and convert_lora_to_gguf.py on tiny LoRA
//! adapters, and summarised the files in tests/fixtures/gguf/reference.json: every metadata
//! key's type and the sha256 of its value bytes, every tensor's name, dims, type and the sha256
//! of its data. tune's file must have the same keys (free-text general.* keys aside), the same
//! values byte for byte, and the same tensors byte for byte.
//!
//! The model exports merge a zero adapter (lora_B = 0: W + s·B·A = W exactly), so the merged
//! checkpoint is the base itself, which is what the converter read.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};
use tune::export::{self, GgufOptions, GgufType, Options, Source};
use tune::gguf::GgufFile;

/// general.* keys the converter fills from the directory name and model card heuristics.
const FREE_TEXT: &[&str] =
    &["general.name", "general.basename", "general.size_label", "general.finetune", "general.version", "general.tags"];

fn free_text(key: &str) -> bool {
    FREE_TEXT.contains(&key) || key.starts_with("general.base_model.")
}

fn hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tune-gguf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn reference() -> serde_json::Value {
    json("gguf/reference.json")
}

/// The families whose converter class reads a SentencePiece tokenizer.model.
const SENTENCEPIECE: &[&str] = &["gemma2", "phi3"];

/// The tiny checkpoint with the test tokenizer (the SentencePiece one for Gemma 2 and Phi-3),
/// as gguf_reference.py prepared it.
fn model_dir(family: &str, tmp: &Path) -> PathBuf {
    let d = tmp.join(family);
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(tiny(family)).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_file() && !name.starts_with("reference") && !name.starts_with("generate") {
            std::fs::copy(&p, d.join(&name)).unwrap();
        }
    }
    if SENTENCEPIECE.contains(&family) {
        let spm = fixtures().join("tokenizer-spm");
        for f in ["tokenizer.json", "tokenizer_config.json", "added_tokens.json"] {
            std::fs::copy(spm.join(f), d.join(f)).unwrap();
        }
        let model = if family == "phi3" { "tokenizer-101.model" } else { "tokenizer.model" };
        std::fs::copy(spm.join(model), d.join("tokenizer.model")).unwrap();
        return d;
    }
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer/tokenizer.json")).unwrap()).unwrap();
    if ["llama", "llama-tied", "mistral"].contains(&family) {
        tok["model"]["byte_fallback"] = false.into();
    }
    if family == "gemma3" {
        tok["model"]["vocab"]["<mask>"] = 23.into();
        tok["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({"id": 23, "content": "<mask>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::copy(fixtures().join("tokenizer/tokenizer_config.json"), d.join("tokenizer_config.json")).unwrap();
    d
}

/// The family's fixture adapter with every lora_B zero.
fn zero_adapter(family: &str, tmp: &Path) -> PathBuf {
    let from = tiny(family).join("lora/adapter");
    let d = tmp.join(format!("{family}-zero"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(from.join("adapter_config.json"), d.join("adapter_config.json")).unwrap();
    let w = tune::hf::Weights::open_file(&from.join("adapter_model.safetensors")).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = w
        .names()
        .map(|n| {
            let shape = w.meta(n).unwrap().shape;
            let mut v = w.read_f32(n, &shape).unwrap();
            if n.contains("lora_B") {
                v.iter_mut().for_each(|x| *x = 0.0);
            }
            (n.to_string(), shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    tune::hf::safetensors::write(&d.join("adapter_model.safetensors"), &tensors, safetensors::Dtype::F32).unwrap();
    d
}

fn source(adapter: &Path) -> Source {
    Source { adapter_dir: adapter.to_path_buf(), step: None, loss: None, recipe_yaml: None }
}

/// Every difference between a GGUF and its reference summary.
fn diff(f: &GgufFile, r: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let rkv = r["kv"].as_object().unwrap();
    for (key, want) in rkv {
        if free_text(key) {
            continue;
        }
        let Some(raw) = f.raw(key) else {
            out.push(format!("missing key {key} = {}", want.get("value").unwrap_or(&want["len"])));
            continue;
        };
        let ty = f.kv.iter().find(|k| &k.key == key).unwrap().value.type_id();
        if ty as u64 != want["type"].as_u64().unwrap() || hex(raw) != want["sha256"].as_str().unwrap() {
            out.push(format!(
                "key {key}: tune {:?}, reference type {} {}",
                f.get(key).unwrap(),
                want["type"],
                want.get("value").unwrap_or(&want["len"])
            ));
        }
    }
    for k in &f.kv {
        if !rkv.contains_key(&k.key) && !free_text(&k.key) {
            out.push(format!("extra key {} = {:?}", k.key, k.value));
        }
    }
    let want: BTreeMap<&str, &serde_json::Value> =
        r["tensors"].as_array().unwrap().iter().map(|t| (t["name"].as_str().unwrap(), t)).collect();
    for (info, _) in &f.tensors {
        let Some(w) = want.get(info.name.as_str()) else {
            out.push(format!("extra tensor {}", info.name));
            continue;
        };
        let ne: Vec<u64> = w["ne"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        if ne != info.ne || w["type"].as_u64().unwrap() != info.ty as u64 {
            out.push(format!("tensor {}: tune {:?} {}, reference {ne:?} type {}", info.name, info.ne, info.ty.name(), w["type"]));
        } else if hex(f.data(&info.name).unwrap()) != w["sha256"].as_str().unwrap() {
            out.push(format!("tensor {}: data differs", info.name));
        }
    }
    for name in want.keys() {
        if f.tensor(name).is_none() {
            out.push(format!("missing tensor {name}"));
        }
    }
    out
}

#[test]
fn tiny_models_match_convert_hf_to_gguf() {
    let r = reference();
    let tmp = temp("models");
    let mut failures = Vec::new();
    for (family, by_type) in r["models"].as_object().unwrap() {
        let base = model_dir(family, &tmp);
        let adapter = zero_adapter(family, &tmp);
        for name in by_type.as_object().unwrap().keys() {
            let ty: GgufType = name.parse().unwrap();
            let out = tmp.join(format!("{family}-{name}.gguf"));
            let opts = Options { base: Some(base.clone()), ..Default::default() };
            // The test tokenizer is unknown to llama.cpp; the reference was made with "default".
            let g = GgufOptions { ty, pre: Some("default".into()) };
            export::export_gguf(&source(&adapter), &out, &opts, &g).unwrap_or_else(|e| panic!("{family} {name}: {e}"));
            let d = diff(&GgufFile::open(&out).unwrap(), &by_type[name.as_str()]);
            failures.extend(d.into_iter().map(|d| format!("{family} {name}: {d}")));
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(failures.is_empty(), "{} differences:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn tiny_adapters_match_convert_lora_to_gguf() {
    let r = reference();
    let tmp = temp("adapters");
    let mut failures = Vec::new();
    for (family, want) in r["adapters"].as_object().unwrap() {
        let base = model_dir(family, &tmp);
        let out = tmp.join(format!("{family}-lora.gguf"));
        let opts = Options { base: Some(base), ..Default::default() };
        export::export_gguf_adapter(&source(&tiny(family).join("lora/adapter")), &out, &opts, GgufType::F32)
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        failures.extend(diff(&GgufFile::open(&out).unwrap(), want).into_iter().map(|d| format!("{family} lora: {d}")));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(failures.is_empty(), "{} differences:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn dora_adapter_is_refused_for_gguf() {
    let tmp = temp("dora");
    let opts = Options { base: Some(tiny("llama")), ..Default::default() };
    let err = export::export_gguf_adapter(&source(&tiny("llama").join("dora/adapter")), &tmp.join("a.gguf"), &opts, GgufType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("DoRA") && err.contains("--gguf"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn gemma2_without_tokenizer_model_is_a_clear_error() {
    let tmp = temp("no-spm");
    let base = model_dir("gemma2", &tmp);
    std::fs::remove_file(base.join("tokenizer.model")).unwrap();
    let adapter = zero_adapter("gemma2", &tmp);
    let opts = Options { base: Some(base.clone()), ..Default::default() };
    let err = export::export_gguf(&source(&adapter), &tmp.join("x.gguf"), &opts, &GgufOptions::default()).unwrap_err().to_string();
    assert!(err.contains(&base.join("tokenizer.model").display().to_string()) && err.contains("SentencePiece"), "{err}");
    assert!(!tmp.join("x.gguf").exists());
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The Modelfile of a ChatML model: Ollama's chatml template, its stops and the eos token.
#[test]
fn ollama_modelfile_for_a_chatml_model() {
    let tmp = temp("ollama");
    let base = model_dir("qwen2", &tmp);
    let adapter = zero_adapter("qwen2", &tmp);
    let opts = Options { base: Some(base), ..Default::default() };
    let g = GgufOptions { ty: GgufType::F32, pre: Some("default".into()) };
    let dir = tmp.join("ollama");
    let written = export::export_ollama(&source(&adapter), &dir, &opts, &g, &Default::default()).unwrap();
    assert_eq!(written.len(), 1);
    let modelfile = std::fs::read_to_string(dir.join("Modelfile")).unwrap();
    assert_eq!(
        modelfile,
        "FROM ./model.gguf\nTEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\"\n\
         PARAMETER stop \"<|im_start|>\"\nPARAMETER stop \"<|im_end|>\"\nPARAMETER stop \"</s>\"\n"
    );
    let f = GgufFile::open(&dir.join("model.gguf")).unwrap();
    assert_eq!(f.get("general.architecture"), Some(&tune::gguf::Value::String("qwen2".into())));
    let _ = std::fs::remove_dir_all(&tmp);
}

/// An unknown chat template is refused with the way out.
#[test]
fn ollama_refuses_an_unknown_template() {
    let tmp = temp("ollama-unknown");
    let base = model_dir("qwen2", &tmp);
    let mut tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(base.join("tokenizer_config.json")).unwrap()).unwrap();
    tc["chat_template"] = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}".into();
    std::fs::write(base.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let adapter = zero_adapter("qwen2", &tmp);
    let opts = Options { base: Some(base), ..Default::default() };
    let err = export::export_ollama(&source(&adapter), &tmp.join("o"), &opts, &GgufOptions::default(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--ollama-template"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

fn real_model(name: &str, dir: PathBuf) {
    let r = json("gguf/real.json");
    let tmp = temp(name);
    // A zero adapter over the real model's q_proj of layer 0.
    let cfg = tune::model::ModelConfig::from_model_dir(&dir).unwrap();
    let q = &cfg.linears()[0];
    let adapter = tmp.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        serde_json::json!({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"})
            .to_string(),
    )
    .unwrap();
    let zeros = |n: usize| vec![0u8; n * 4];
    tune::hf::safetensors::write(
        &adapter.join("adapter_model.safetensors"),
        &[
            (format!("base_model.model.{}.lora_A.weight", q.path), vec![1, q.in_features], zeros(q.in_features)),
            (format!("base_model.model.{}.lora_B.weight", q.path), vec![q.out_features, 1], zeros(q.out_features)),
        ],
        safetensors::Dtype::F32,
    )
    .unwrap();
    let out = tmp.join("model.gguf");
    let opts = Options { base: Some(dir), ..Default::default() };
    export::export_gguf(&source(&adapter), &out, &opts, &GgufOptions { ty: GgufType::F32, pre: None }).unwrap();
    let d = diff(&GgufFile::open(&out).unwrap(), &r[name]);
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(d.is_empty(), "{} differences:\n{}", d.len(), d.join("\n"));
}

#[test]
#[ignore = "needs SmolLM2-135M-Instruct (TUNE_SMOLLM2)"]
fn smollm2_matches_convert_hf_to_gguf() {
    real_model("smollm2", require_model(smollm2_dir(), "scripts/fetch-smollm2.sh"));
}

#[test]
#[ignore = "needs Gemma 3 270M (TUNE_GEMMA3)"]
fn gemma3_matches_convert_hf_to_gguf() {
    real_model("gemma3", require_model(gemma3_dir(), "scripts/fetch-gemma3.sh"));
}
