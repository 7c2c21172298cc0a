//! `dataset.chat_template` through the `tune` binary, on a tiny base model without a chat
//! template: chat data without one is refused before training; with one, the run saves it with
//! every adapter it writes (run, checkpoints, exports) and `tune generate --adapter` renders
//! with it.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tune::hf::chat_template::CHATML;
use tune::hf::{Message, Tokenizer};

/// A tiny random Llama with the test tokenizer (which knows `<|im_start|>` and `<|im_end|>`),
/// its tokenizer_config.json stripped of the chat template: a base model.
fn base_model(root: &Path) -> PathBuf {
    let dir = root.join("model");
    write_tiny_model(&dir, 3);
    let config_path = dir.join("tokenizer_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&config_path, config.to_string()).unwrap();
    assert!(Tokenizer::from_model_dir(&dir).unwrap().chat_template().is_none());
    dir
}

fn scratch(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("tune-chat-template-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    root
}

/// A chat dataset and a recipe training on it for 2 steps, a checkpoint after each, exporting
/// both profiles.
fn recipe(root: &Path, model: &Path) -> PathBuf {
    let lines: Vec<String> = ["hello", "world", "hello world", "hold door"]
        .iter()
        .map(|a| {
            serde_json::json!({"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": a}]}).to_string()
        })
        .collect();
    let data = root.join("chat.jsonl");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let recipe = root.join("recipe.yaml");
    let text = format!(
        "model:\n  path: {}\nlora:\n  rank: 2\ndataset:\n  path: {}\n  max_seq_len: 64\ntrain:\n  max_steps: 2\n  batch_size: 2\n  lr: 1.0e-2\noutput:\n  dir: {}\n  save_every: 1\n  export: both\n  export_dtype: f32\n",
        model.display(),
        data.display(),
        root.join("run").display()
    );
    std::fs::write(&recipe, text).unwrap();
    recipe
}

#[test]
fn chat_data_without_a_template_is_refused_before_training() {
    let root = scratch("refused");
    let model = base_model(&root);
    let recipe = recipe(&root, &model);
    for verb in ["validate", "run"] {
        let (code, stderr) = tune(&[verb, s(&recipe)]);
        assert_ne!(code, 0, "tune {verb} should fail");
        assert!(stderr.contains("dataset.chat_template"), "{stderr}");
        assert!(stderr.contains(&model.display().to_string()), "{stderr}");
        assert!(stderr.contains("chat.jsonl"), "{stderr}");
    }
    // Nothing was trained or written.
    assert!(!root.join("run").exists());
    // An unknown built-in is refused too, listing the built-ins.
    let (code, stderr) = tune(&["run", s(&recipe), "dataset.chat_template=chatm"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("unknown built-in template `chatm`") && stderr.contains("built-ins: chatml"), "{stderr}");
    let _ = std::fs::remove_dir_all(&root);
}

/// The prompt token count `tune generate` reports on stderr.
fn prompt_tokens(stderr: &str) -> usize {
    let line = stderr.lines().find(|l| l.contains(" prompt tokens in ")).unwrap_or_else(|| panic!("{stderr}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

fn generate(model: &Path, adapter: Option<&Path>) -> (i32, String) {
    let mut args = vec!["generate", "--model", s(model), "--prompt", "hello", "--max-new-tokens", "2"];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    tune(&args)
}

#[test]
fn builtin_template_goes_with_every_adapter_and_generate_uses_it() {
    let root = scratch("chatml");
    let model = base_model(&root);
    let recipe = recipe(&root, &model);
    let (code, stderr) = tune(&["run", s(&recipe), "dataset.chat_template=chatml"]);
    assert_eq!(code, 0, "{stderr}");
    let run = root.join("run");
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(read(run.join("adapter/chat_template.jinja")), CHATML);
    for step in ["step_000001", "step_000002"] {
        assert_eq!(read(run.join("checkpoints").join(step).join("adapter/chat_template.jinja")), CHATML);
    }
    assert_eq!(read(run.join("export/adapter/chat_template.jinja")), CHATML);
    assert_eq!(read(run.join("export/merged/chat_template.jinja")), CHATML);
    // The run's chat date (strftime_now) is recorded in its checkpoints.
    let state: serde_json::Value = serde_json::from_str(&read(run.join("checkpoints/step_000002/trainer_state.json"))).unwrap();
    let date: tune::hf::ChatDate = state["chat_date"].as_str().unwrap().parse().unwrap();
    assert!(date <= tune::hf::ChatDate::today(), "{state}");
    // `tune export` of a checkpoint carries it too.
    let out = root.join("exported");
    let (code, stderr) = tune(&["export", s(&run.join("checkpoints/step_000001")), "--adapter", s(&out)]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read(out.join("chat_template.jinja")), CHATML);

    // The base model alone cannot chat; with the adapter (run dir, adapter dir or export),
    // generate renders the prompt with the adapter's template.
    let tok = Tokenizer::from_model_dir(&model).unwrap();
    let text = tune::hf::ChatTemplate::new(CHATML, tok.bos_token(), tok.eos_token())
        .unwrap()
        .render(&[Message::new("user", "hello")], true)
        .unwrap();
    assert_eq!(text, "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n");
    let expected = tok.encode(&text, false).unwrap().len();
    let (code, stderr) = generate(&model, None);
    assert_ne!(code, 0);
    assert!(stderr.contains("no chat template"), "{stderr}");
    for adapter in [run.clone(), run.join("adapter"), run.join("export/adapter")] {
        let (code, stderr) = generate(&model, Some(&adapter));
        assert_eq!(code, 0, "{stderr}");
        assert!(stderr.contains("chat_template.jinja"), "{stderr}");
        assert_eq!(prompt_tokens(&stderr), expected, "{stderr}");
    }
    // The merged model holds the template where transformers looks for it.
    let (code, stderr) = generate(&run.join("export/merged"), None);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(prompt_tokens(&stderr), expected, "{stderr}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn jinja_file_template_is_used_and_saved() {
    let root = scratch("file");
    let model = base_model(&root);
    let recipe = recipe(&root, &model);
    let source =
        "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}";
    std::fs::write(root.join("mine.jinja"), source).unwrap();
    // Relative to the current directory (the test runs tune from the repository root).
    let relative = pathdiff(&root.join("mine.jinja"));
    let (code, stderr) = tune(&["run", s(&recipe), &format!("dataset.chat_template={relative}"), "output.export=none"]);
    assert_eq!(code, 0, "{stderr}");
    let run = root.join("run");
    assert_eq!(std::fs::read_to_string(run.join("adapter/chat_template.jinja")).unwrap(), source);
    let recorded = std::fs::read_to_string(run.join("recipe.yaml")).unwrap();
    // Recorded absolute, resolved against the current directory as other recipe paths are.
    let absolute = Path::new(env!("CARGO_MANIFEST_DIR")).join(&relative);
    assert!(recorded.contains(&format!("chat_template: {}\n", absolute.display())), "{recorded}");
    let (code, stderr) = generate(&model, Some(&run));
    assert_eq!(code, 0, "{stderr}");
    let tok = Tokenizer::from_model_dir(&model).unwrap();
    assert_eq!(prompt_tokens(&stderr), tok.encode("<|im_start|>hello<|im_end|><|im_start|>", false).unwrap().len());
    let _ = std::fs::remove_dir_all(&root);
}

/// `path` relative to the repository root (where `tune()` runs the binary).
fn pathdiff(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let depth = root.components().count() - 1;
    format!("{}{}", "../".repeat(depth), path.strip_prefix("/").unwrap().display())
}
