//! Bad input through the `tune` binary: a clear message on stderr naming the file and what was
//! expected, a non-zero exit, never a panic.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn fails_with(args: &[&str], needles: &[&str]) {
    let (code, stderr) = tune(args);
    assert_ne!(code, 0, "expected failure for {args:?}");
    for n in needles {
        assert!(stderr.contains(n), "stderr for {args:?} lacks {n:?}:\n{stderr}");
    }
}

/// A copy of a tiny model (with the test tokenizer) that a test may break.
fn model_copy(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tune-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_tiny_model(&dir, 1);
    dir
}

#[test]
fn missing_directory_and_files() {
    fails_with(&["inspect", "/no/such/model"], &["/no/such/model", "not found"]);
    fails_with(&["eval", "--model", "/no/such/model", "--data", "x.jsonl"], &["/no/such/model"]);
    let dir = model_copy("nofiles");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    fails_with(&["inspect", s(&dir)], &["no model.safetensors"]);
    let data = dir.join("missing.jsonl");
    let dir = model_copy("nodata");
    fails_with(&["eval", "--model", s(&dir), "--data", s(&data)], &["missing.jsonl", "No such file"]);
}

#[test]
fn unknown_model_type_names_the_supported_ones() {
    let dir = model_copy("type");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("\"llama\"", "\"falcon\"");
    std::fs::write(dir.join("config.json"), config).unwrap();
    fails_with(&["inspect", s(&dir)], &["config.json", "falcon", "llama, mistral, qwen2, qwen3, gemma3_text", "gpt2, gpt_neox, bloom"]);
}

#[test]
fn invalid_json_config_names_line_and_column() {
    let dir = model_copy("json");
    std::fs::write(dir.join("config.json"), "{\n  \"model_type\": \"llama\",\n  oops\n}").unwrap();
    fails_with(&["inspect", s(&dir)], &["config.json", "line 3"]);
    let dir = model_copy("missingkey");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\"}").unwrap();
    fails_with(&["inspect", s(&dir)], &["config.json", "missing field `vocab_size`"]);
}

#[test]
fn tensor_problems_name_the_tensor() {
    // Missing tensor: load a checkpoint whose config asks for a third layer.
    let dir = model_copy("missing");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":3");
    std::fs::write(dir.join("config.json"), config).unwrap();
    fails_with(&["generate", "--model", s(&dir), "--prompt", "hello", "--raw"], &["model.layers.2.", "missing"]);
    // Shape mismatch: a wider hidden size than the weights have.
    let dir = model_copy("shape");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("\"intermediate_size\":64", "\"intermediate_size\":96");
    std::fs::write(dir.join("config.json"), config).unwrap();
    fails_with(&["generate", "--model", s(&dir), "--prompt", "hello", "--raw"], &["gate_proj.weight", "expected [96, 32], found [64, 32]"]);
    // Unexpected tensor: a fewer-layer config than the weights.
    let dir = model_copy("unexpected");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":1");
    std::fs::write(dir.join("config.json"), config).unwrap();
    fails_with(&["generate", "--model", s(&dir), "--prompt", "hello", "--raw"], &["model.layers.1.", "unexpected tensor"]);
}

#[test]
fn corrupt_safetensors_is_refused() {
    let dir = model_copy("corrupt");
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&["inspect", s(&dir)], &["model.safetensors", "truncated or corrupt"]);
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    fails_with(&["inspect", s(&dir)], &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn bad_data_lines_name_file_and_line() {
    let dir = model_copy("data");
    let data = dir.join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"hello\"}\n{\"text\": \"world\"\n").unwrap();
    fails_with(&["eval", "--model", s(&dir), "--data", s(&data)], &["bad.jsonl", "line 2"]);
    std::fs::write(&data, "{\"content\": \"hello\"}\n").unwrap();
    fails_with(&["eval", "--model", s(&dir), "--data", s(&data)], &["bad.jsonl", "line 1", "missing key `text`"]);
}

#[test]
fn eval_and_generate_work_on_the_tiny_model() {
    // The happy path beside the failures: these must succeed, with the numbers where they belong.
    let dir = model_copy("ok");
    let data = dir.join("ok.jsonl");
    write_text_dataset(&data, 3, 1);
    let out = Command::new(env!("CARGO_BIN_EXE_tune")).args(["eval", "--model", s(&dir), "--data", s(&data), "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (loss, ppl) = (v["loss"].as_f64().unwrap(), v["perplexity"].as_f64().unwrap());
    assert!(loss > 0.0 && (ppl - loss.exp()).abs() < 1e-9 * ppl && v["tokens"].as_u64().unwrap() > 0);
    let out = Command::new(env!("CARGO_BIN_EXE_tune"))
        .args(["generate", "--model", s(&dir), "--prompt", "hello", "--raw", "--max-new-tokens", "5"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens/s"), "speed goes to stderr");
    // Adapters are refused when they do not fit, naming the tensor.
    fails_with(
        &["eval", "--model", s(&dir), "--data", s(&data), "--adapter", s(&tiny("llama").join("lora/adapter"))],
        &["lora_A.weight", "expected", "found"],
    );
}
