//! `tune export`: the adapter profile and merged weights, checked against what PEFT and
//! transformers made of the very same files (tests/fixtures/reference.py --export-check wrote
//! tests/fixtures/export/: the logits both computed and fingerprints of the files they loaded).
//!
//! Tolerances, as max |Δlogit| / max |logit| on the tiny random models (std 0.2 weights, so
//! logits are large and sensitive):
//! - tune vs PEFT/transformers on the same exported files: 1e-4 (both compute in f32 from the
//!   same stored values; this is the parity tolerance).
//! - f32 export vs PEFT's base + the original adapter: 1e-5 (merging reorders one sum).
//! - bf16 export vs the original: adapter 1e-2, merged 5e-2. Every merged weight is rounded to
//!   bf16 (2⁻⁹ relative), which two layers of these wide random weights amplify to ~2e-2. A DoRA
//!   adapter's bf16 magnitude scales its whole output feature, W·x included, as a rounded merged
//!   weight does: 2e-2 (measured 1.4e-2 on Phi-3), where LoRA's rounding touches only s·B·A·x.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use tune::export::{self, OutDtype};
use tune::model::token_tensor;
use tune::model::{self, AttentionMask, CausalLm};

const VARIANTS: &[(&str, &str)] = &[
    ("llama", "lora"),
    ("llama-tied", "lora"),
    ("llama-tied", "lora-rslora"),
    ("llama-linear", "lora"),
    ("mistral", "lora"),
    ("qwen2", "lora"),
    ("qwen3", "lora"),
    ("gemma3", "lora"),
    ("gemma2", "lora"),
    ("phi3", "lora"),
    ("gpt2", "lora"),
    ("gpt-neox", "lora"),
    ("bloom", "lora"),
    ("llama", "dora"),
    ("gpt2", "dora"),
    ("phi3", "dora"),
];

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tune-export-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn report() -> serde_json::Value {
    let path = fixtures().join("export/report.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn fingerprint(path: &Path) -> String {
    tune::train::checkpoint::file_fingerprint(path).unwrap()
}

/// Logits of one sequence.
fn logits(model: &CausalLm<B>, ids: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let positions: Vec<usize> = (0..ids.len()).collect();
    let hidden = model.forward_hidden(token_tensor::<B>(ids, 1, &device), &positions, &AttentionMask::Causal, None);
    model.lm_head(hidden).into_data().iter::<f32>().collect()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (d, s) = max_abs_diff(a, b);
    d / s
}

/// Exports `variant`'s PEFT adapter both ways in `dtype`, as the fixture script did.
fn export_both(fam: &str, variant: &str, dtype: OutDtype, out: &Path) {
    let src = export::resolve_source(&tiny(fam).join(variant).join("adapter")).unwrap();
    let opts = export::Options { dtype, base: Some(tiny(fam)), base_name: None, overwrite: false };
    export::export_adapter(&src, &out.join("adapter"), &opts).unwrap();
    export::export_merged(&src, &out.join("merged"), 100_000, &opts).unwrap();
}

#[test]
fn exports_load_in_peft_and_transformers_with_matching_logits() {
    let report = report();
    let device = Default::default();
    for (fam, variant) in VARIANTS {
        let key = format!("{fam}-{variant}");
        let refs: HashMap<String, RefTensor> = read_reference(&fixtures().join(format!("export/{key}.safetensors")));
        let ids = refs["input_ids"].ids();
        let original = refs["reference"].f32s();
        let bf16_adapter_tol = if *variant == "dora" { 2e-2 } else { 1e-2 };
        for (dtype, name, adapter_tol, merged_tol) in [(OutDtype::F32, "f32", 1e-5, 1e-5), (OutDtype::Bf16, "bf16", bf16_adapter_tol, 5e-2)]
        {
            let entry = &report["variants"][&key][name];
            let what = format!("{key} {name}");
            for k in [
                "adapter_missing_keys",
                "adapter_unexpected_keys",
                "adapter_warnings",
                "merged_missing_keys",
                "merged_unexpected_keys",
                "merged_mismatched_keys",
            ] {
                assert_eq!(entry[k].as_array().map(Vec::len), Some(0), "{what}: {k} = {}", entry[k]);
            }
            // The committed verdicts are about exactly what this code writes.
            let out = temp(&format!("{key}-{name}"));
            export_both(fam, variant, dtype, &out);
            assert_eq!(
                fingerprint(&out.join("adapter/adapter_model.safetensors")),
                entry["adapter_fingerprint"].as_str().unwrap(),
                "{what}: the exported adapter differs from the one PEFT loaded; rerun reference.py --export-check"
            );
            for (file, fp) in entry["merged_fingerprints"].as_object().unwrap() {
                assert_eq!(&fingerprint(&out.join("merged").join(file)), fp.as_str().unwrap(), "{what}: merged {file} differs");
            }

            // tune on the exported adapter = PEFT on the exported adapter.
            let mut m: CausalLm<B> = model::load(&tiny(fam), &device).unwrap();
            tune::peft::load_peft(&mut m, &out.join("adapter"), &device).unwrap();
            let ours = logits(&m, &ids);
            let r = rel(&ours, &refs[&format!("adapter_{name}")].f32s());
            assert!(r <= 1e-4, "{what}: tune vs PEFT on the exported adapter: {r:.2e}");
            let r = rel(&ours, &original);
            assert!(r <= adapter_tol, "{what}: exported adapter vs original: {r:.2e} > {adapter_tol:e}");

            // tune on the merged directory = transformers on it ≈ PEFT base + adapter.
            let merged: CausalLm<B> = model::load(&out.join("merged"), &device).unwrap();
            let ours = logits(&merged, &ids);
            let r = rel(&ours, &refs[&format!("merged_{name}")].f32s());
            assert!(r <= 1e-4, "{what}: tune vs transformers on the merged export: {r:.2e}");
            let r = rel(&ours, &original);
            assert!(r <= merged_tol, "{what}: merged vs base + adapter: {r:.2e} > {merged_tol:e}");
            let recorded = entry["merged_vs_peft_rel"].as_f64().unwrap();
            assert!(recorded <= merged_tol, "{what}: transformers' merged vs PEFT: {recorded:.2e}");
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
}

/// GPT-2's Conv1D layers: the adapter says fan_in_fan_out (as PEFT's do), and the merged
/// weights keep the stored [in, out] layout, with B·A added transposed.
#[test]
fn gpt2_exports_keep_the_conv1d_layout() {
    let out = temp("gpt2");
    export_both("gpt2", "lora", OutDtype::F32, &out);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["fan_in_fan_out"], true);
    assert_eq!(config["target_modules"], serde_json::json!(["c_attn", "c_fc", "c_proj"]));
    let base = tune::hf::Weights::open(&tiny("gpt2")).unwrap();
    let merged = tune::hf::Weights::open(&out.join("merged")).unwrap();
    // hidden 64, 4·64 = 256 in the MLP: [in, out] for c_attn (64 -> 3·64) and the MLP's c_proj (256 -> 64).
    for (name, stored) in [("transformer.h.0.attn.c_attn.weight", [64, 192]), ("transformer.h.1.mlp.c_proj.weight", [256, 64])] {
        assert_eq!(base.meta(name).unwrap().shape, stored, "{name}: Conv1D is stored [in, out]");
        assert_eq!(merged.meta(name).unwrap().shape, stored, "{name}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn adapter_profile_is_what_every_consumer_accepts() {
    // The rsLoRA variant: alpha 16, r 8, scale 16/√8 — exported as use_rslora false, an integer
    // alpha, and lora_B multiplied by √8 so that alpha/r times B equals the trained scale.
    let out = temp("profile");
    export_both("llama-tied", "lora-rslora", OutDtype::F32, &out);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["use_rslora"], false);
    assert_eq!(config["use_dora"], false);
    assert_eq!(config["bias"], "none");
    assert_eq!(config["fan_in_fan_out"], false);
    assert!(config["modules_to_save"].is_null());
    assert!(config["lora_alpha"].is_u64(), "lora_alpha must be an integer: {}", config["lora_alpha"]);
    assert_eq!(config["lora_alpha"], 16);
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert_eq!(config["base_model_name_or_path"], "tests/fixtures/tiny/llama-tied");
    let original = read_reference(&tiny("llama-tied").join("lora-rslora/adapter/adapter_model.safetensors"));
    let exported = read_reference(&out.join("adapter/adapter_model.safetensors"));
    assert_eq!(original.len(), exported.len(), "only lora_A/lora_B tensors");
    for (k, v) in &original {
        let factor = if k.contains("lora_B") { 8f32.sqrt() } else { 1.0 };
        let want: Vec<f32> = v.f32s().iter().map(|x| x * factor).collect();
        let r = rel(&exported[k].f32s(), &want);
        assert!(r < 1e-6, "{k}: {r:.2e}");
    }
    assert!(std::fs::read_to_string(out.join("adapter/README.md")).unwrap().contains("use_rslora false"));

    // Merged: tied embeddings stay tied, the dtype is recorded, tokenizer files come along,
    // and shards respect the limit with an index naming every tensor.
    let merged = out.join("merged");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], true);
    let dtype_key = if config.get("dtype").is_some() { "dtype" } else { "torch_dtype" };
    assert_eq!(config[dtype_key], "float32");
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(merged.join(f).is_file(), "{f} not copied");
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("model.safetensors.index.json")).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert!(!map.contains_key("lm_head.weight"), "a tied model gains no lm_head");
    let base = tune::hf::Weights::open(&tiny("llama-tied")).unwrap();
    assert_eq!(map.len(), base.names().count());
    let mut total = 0;
    for file in map.values().map(|v| v.as_str().unwrap()).collect::<std::collections::BTreeSet<_>>() {
        let st = read_reference(&merged.join(file));
        let bytes: usize = st.values().map(|t| t.values.len() * 4).sum();
        total += bytes;
        assert!(bytes <= 100_000 || st.len() == 1, "{file}: {bytes} bytes over the 100KB shard limit");
    }
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
    std::fs::remove_dir_all(&out).unwrap();
}

/// DoRA: the adapter export keeps every tensor (A, B and lora_magnitude_vector, nothing folded:
/// alpha is an integer and rsLoRA off) and says use_dora; the merged weight of each output
/// feature has norm m, the magnitude: W' = m · (W + s·B·A) / ‖W + s·B·A‖, in the checkpoint's
/// layout (GPT-2's Conv1D [in, out] and fused c_attn, Phi-3's fused qkv_proj, Llama's [out, in]).
#[test]
fn dora_exports_keep_the_magnitudes_and_merge_to_them() {
    for fam in ["llama", "gpt2", "phi3"] {
        let out = temp(&format!("dora-{fam}"));
        export_both(fam, "dora", OutDtype::F32, &out);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
        assert_eq!(config["use_dora"], true, "{fam}");
        assert_eq!(config["fan_in_fan_out"], fam == "gpt2", "{fam}");
        let original = read_reference(&tiny(fam).join("dora/adapter/adapter_model.safetensors"));
        let exported = read_reference(&out.join("adapter/adapter_model.safetensors"));
        assert_eq!(original.len(), exported.len(), "{fam}: the same tensors");
        for (k, v) in &original {
            assert_eq!(exported[k].values, v.values, "{fam}: {k}");
        }
        let base = tune::hf::Weights::open(&tiny(fam)).unwrap();
        let merged = tune::hf::Weights::open(&out.join("merged")).unwrap();
        let mut checked = 0;
        for (key, m) in original.iter().filter(|(k, _)| k.ends_with(tune::peft::MAGNITUDE)) {
            let module = key.strip_prefix("base_model.model.").unwrap().strip_suffix(".lora_magnitude_vector").unwrap();
            let name = format!("{module}.weight");
            let shape = base.meta(&name).unwrap().shape;
            let w = merged.read_f32(&name, &shape).unwrap();
            let out_features = m.values.len();
            // [out, in], or [in, out] for Conv1D.
            let conv1d = fam == "gpt2";
            assert_eq!(shape[usize::from(conv1d)], out_features, "{fam}: {name} {shape:?}");
            let norms: Vec<f32> = (0..out_features)
                .map(|o| {
                    let row: Vec<f64> = if conv1d {
                        (0..shape[0]).map(|i| w[i * out_features + o] as f64).collect()
                    } else {
                        w[o * shape[1]..(o + 1) * shape[1]].iter().map(|&x| x as f64).collect()
                    };
                    row.iter().map(|x| x * x).sum::<f64>().sqrt() as f32
                })
                .collect();
            let r = rel(&norms, &m.f32s());
            assert!(r <= 1e-5, "{fam}: {name}: the merged rows' norms vs lora_magnitude_vector: {r:.2e}");
            // And the weights did change direction, not only scale: W' ≠ W·m/‖W‖.
            let before = base.read_f32(&name, &shape).unwrap();
            assert!(rel(&w, &before) > 1e-2, "{fam}: {name} barely changed");
            checked += 1;
        }
        assert!(checked > 0, "{fam}: no magnitudes checked");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Nothing named like a temporary sibling of `dir` is left in its parent.
fn no_leftovers(dir: &Path) {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    if let Ok(entries) = std::fs::read_dir(dir.parent().unwrap()) {
        for e in entries {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.starts_with(&format!(".{name}.tmp")), "left behind: {n}");
        }
    }
}

#[test]
fn bad_exports_fail_clearly_and_leave_nothing() {
    let root = temp("bad");
    std::fs::create_dir_all(root.join("empty-run/checkpoints")).unwrap();
    let out = root.join("out");

    // A run with no complete checkpoint.
    let (code, err) = tune(&["export", s(&root.join("empty-run")), "--adapter", s(&out)]);
    assert_ne!(code, 0);
    assert!(err.contains("nothing to export") && err.contains("empty-run"), "{err}");
    assert!(!out.exists());

    // An adapter from another base model: the tensor is named.
    let (code, err) =
        tune(&["export", "tests/fixtures/tiny/qwen3/lora/adapter", "--merged", s(&out), "--model", "tests/fixtures/tiny/llama"]);
    assert_ne!(code, 0);
    assert!(err.contains("shape mismatch") && err.contains("lora_A.weight") && err.contains("another model"), "{err}");
    assert!(!out.exists());
    no_leftovers(&out);

    // A DoRA adapter whose config says use_dora: false (its magnitudes would be dropped), and a
    // LoRA adapter whose config says use_dora: true (it has none): both named.
    for (from, flip, expect) in [
        ("dora", ("\"use_dora\": true", "\"use_dora\": false"), "lora_magnitude_vector"),
        ("lora", ("\"use_dora\": false", "\"use_dora\": true"), "missing"),
    ] {
        let adapter = root.join(format!("flipped-{from}"));
        std::fs::create_dir_all(&adapter).unwrap();
        let src = tiny("llama").join(from).join("adapter");
        std::fs::copy(src.join("adapter_model.safetensors"), adapter.join("adapter_model.safetensors")).unwrap();
        let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
        assert!(text.contains(flip.0), "{from}: {text}");
        std::fs::write(adapter.join("adapter_config.json"), text.replace(flip.0, flip.1)).unwrap();
        for how in ["--adapter", "--merged"] {
            let (code, err) = tune(&["export", s(&adapter), how, s(&out), "--model", "tests/fixtures/tiny/llama"]);
            assert_ne!(code, 0);
            assert!(err.contains(expect) && err.contains("use_dora") && err.contains("lora_magnitude_vector"), "{from} {how}: {err}");
            assert!(!out.exists());
        }
        let mut m: CausalLm<B> = model::load(&tiny("llama"), &Default::default()).unwrap();
        let err = tune::peft::load_peft(&mut m, &adapter, &Default::default()).unwrap_err().to_string();
        assert!(err.contains(expect) && err.contains("use_dora") && err.contains("lora_magnitude_vector"), "{from} load_peft: {err}");
    }

    // Merged without a base model to merge into.
    std::fs::create_dir_all(root.join("adapter")).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let text = std::fs::read(tiny("llama").join("lora/adapter").join(f)).unwrap();
        let text = if f.ends_with(".json") {
            String::from_utf8(text).unwrap().replace("tests/fixtures/tiny/llama", "someone/not-here").into_bytes()
        } else {
            text
        };
        std::fs::write(root.join("adapter").join(f), text).unwrap();
    }
    let (code, err) = tune(&["export", s(&root.join("adapter")), "--merged", s(&out)]);
    assert_ne!(code, 0);
    assert!(err.contains("--model") && err.contains("someone/not-here"), "{err}");

    // An output that cannot be written (its parent is a file).
    std::fs::write(root.join("file"), "x").unwrap();
    let (code, err) = tune(&["export", "tests/fixtures/tiny/llama/lora/adapter", "--adapter", s(&root.join("file/out"))]);
    assert_ne!(code, 0);
    assert!(err.contains("file"), "{err}");

    // An existing output is kept unless --overwrite.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("precious"), "keep").unwrap();
    let (code, err) = tune(&["export", "tests/fixtures/tiny/llama/lora/adapter", "--adapter", s(&out)]);
    assert_ne!(code, 0);
    assert!(err.contains("--overwrite"), "{err}");
    assert!(out.join("precious").is_file());
    let (code, err) = tune(&["export", "tests/fixtures/tiny/llama/lora/adapter", "--adapter", s(&out), "--overwrite"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.join("precious").exists() && out.join("adapter_config.json").is_file());

    // A bad dtype and a bad shard size name the option.
    let (code, err) = tune(&["export", "tests/fixtures/tiny/llama/lora/adapter", "--adapter", s(&out), "--dtype", "fp8"]);
    assert_ne!(code, 0);
    assert!(err.contains("--dtype") && err.contains("bf16"), "{err}");
    let (code, err) = tune(&["export", "tests/fixtures/tiny/llama/lora/adapter", "--merged", s(&out), "--max-shard-size", "5 parsecs"]);
    assert_ne!(code, 0);
    assert!(err.contains("--max-shard-size"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// `output.export: both` at the end of `tune run`: the run's own adapter, the portable adapter
/// with a model card giving steps and final loss, and merged weights that tune evaluates to the
/// same loss as base + adapter. Exports from the run and checkpoint directories agree, and all
/// of them work as `--adapter`.
#[test]
fn run_exports_at_the_end_and_exports_resolve_from_runs_and_checkpoints() {
    let dir = temp("run");
    let (code, err) = tune(&[
        "run",
        "tests/fixtures/tiny-run/recipe.yaml",
        &format!("output.dir={}", dir.display()),
        "output.export=both",
        "output.export_dtype=f32",
    ]);
    assert_eq!(code, 0, "{err}");
    let metrics = tune::train::metrics::read(&dir.join("metrics.jsonl")).unwrap();
    let last = metrics.last().unwrap();
    let card = std::fs::read_to_string(dir.join("export/adapter/README.md")).unwrap();
    assert!(card.contains(&format!("optimizer steps: {}", last.step)), "{card}");
    assert!(card.contains(&format!("final training loss: {:.4}", last.loss)), "{card}");
    assert!(card.contains("## Recipe"), "{card}");

    let eval = |model: &str, adapter: Option<&Path>| -> f64 {
        let mut args = vec!["eval", "--model", model, "--data", "tests/fixtures/tiny-run/data.jsonl", "--json"];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        let out = Command::new(env!("CARGO_BIN_EXE_tune")).current_dir(env!("CARGO_MANIFEST_DIR")).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let base = "tests/fixtures/tiny/llama-tied";
    let with_adapter = eval(base, Some(&dir.join("adapter")));
    let checkpoint = tune::train::checkpoint::list(&dir).pop().unwrap().dir;
    for adapter in [dir.clone(), checkpoint.clone(), dir.join("export/adapter")] {
        let loss = eval(base, Some(&adapter));
        assert!((loss - with_adapter).abs() <= 1e-6 * with_adapter, "--adapter {}: {loss} vs {with_adapter}", adapter.display());
    }
    let merged = eval(s(&dir.join("export/merged")), None);
    assert!((merged - with_adapter).abs() <= 1e-5 * with_adapter, "merged {merged} vs base + adapter {with_adapter}");
    assert!((eval(base, None) - with_adapter).abs() > 1e-3, "the adapter must change the loss for this test to mean anything");

    // SRC as the run directory and as its checkpoint give the same file.
    let a = temp("from-run");
    let b = temp("from-checkpoint");
    assert_eq!(tune(&["export", s(&dir), "--adapter", s(&a)]).0, 0);
    assert_eq!(tune(&["export", s(&checkpoint), "--adapter", s(&b)]).0, 0);
    let name = "adapter_model.safetensors";
    assert_eq!(fingerprint(&a.join(name)), fingerprint(&b.join(name)));
    for d in [dir, a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
