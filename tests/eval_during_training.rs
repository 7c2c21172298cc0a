//! Evaluation during training (dataset.eval_path / eval_split, train.eval_every, output.save_best,
//! train.early_stopping_patience) and the windowed eval loss it shares with `tune eval`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use tune::data::examples::Example;
use tune::eval::{evaluate_examples, Window};
use tune::recipe::Recipe;
use tune::train::checkpoint::{self, EvalState};
use tune::train::metrics::{self, StepMetrics};
use tune::train::{self, Observer, Start};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tune-evalrun-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Distinct text records over the test tokenizer's alphabet: the i-th spells i in words.
fn write_distinct(path: &Path, n: usize, offset: usize) {
    let words = ["hello", "world", "hold", "lord", "herd", "roll", "wheel", "door", "red", "owl"];
    let lines: Vec<String> = (offset..offset + n)
        .map(|i| {
            let text: Vec<&str> = format!("{:03}", i).chars().map(|c| words[c.to_digit(10).unwrap() as usize]).collect();
            serde_json::json!({ "text": format!("{} {}", text.join(" "), words[i % 10]) }).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// A tiny model, a training file, an eval file with one record longer than the window, and a
/// recipe evaluating every 2 steps with LoRA dropout on (which the eval must not apply).
fn setup(tag: &str, lr: f64, extra: &str) -> (PathBuf, PathBuf) {
    let root = temp(tag);
    write_tiny_model(&root.join("model"), 3);
    write_text_dataset(&root.join("train.jsonl"), 24, 5);
    write_text_dataset(&root.join("eval.jsonl"), 6, 77);
    let long = ["hello world held red door"; 12].join(" ");
    let mut eval = std::fs::read_to_string(root.join("eval.jsonl")).unwrap();
    eval += &(serde_json::json!({ "text": long }).to_string() + "\n");
    std::fs::write(root.join("eval.jsonl"), eval).unwrap();
    let recipe = root.join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "model:\n  path: {root}/model\nlora:\n  rank: 4\n  alpha: 8\n  dropout: 0.1\n  target_modules: all-linear\n\
             dataset:\n  path: {root}/train.jsonl\n  eval_path: {root}/eval.jsonl\n  max_seq_len: 32\n  shuffle: true\n\
             train:\n  max_steps: 24\n  batch_size: 2\n  grad_accum: 2\n  lr: {lr}\n  max_grad_norm: null\n  schedule: constant\n  seed: 11\n  eval_every: 2\n{extra}\
             output:\n  dir: {root}/run\n  save_every: 2\n  keep_last: 0\n  save_best: true\n  export: none\n",
            root = root.display()
        ),
    )
    .unwrap();
    (root, recipe)
}

fn evals(m: &[StepMetrics]) -> Vec<(usize, f64)> {
    m.iter().filter_map(|m| m.eval_loss.map(|l| (m.step, l))).collect()
}

/// Stops after a given step, as Ctrl-C does; records what the loop reported.
#[derive(Default)]
struct Recorder {
    stop_after: Option<usize>,
    done: usize,
    evals: Vec<(usize, f64)>,
    stopped: Option<(usize, String)>,
}

impl Observer for Recorder {
    fn step(&mut self, m: &StepMetrics) {
        self.done = m.step;
    }
    fn eval(&mut self, step: usize, report: &tune::eval::EvalReport, _: &EvalState) {
        self.evals.push((step, report.loss));
    }
    fn stopped_early(&mut self, step: usize, reason: &str) {
        self.stopped = Some((step, reason.to_string()));
    }
    fn should_stop(&self) -> bool {
        self.stop_after.is_some_and(|k| self.done >= k)
    }
}

fn train_in_process(recipe: &Path, overrides: &[&str], start: Start, observer: &mut Recorder) -> train::Summary {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let recipe = Recipe::load(recipe, &o).unwrap();
    train::train::<B>(&recipe, start, observer).unwrap()
}

/// The loss logged at step N is `tune eval --adapter checkpoints/step_N` on the eval file with
/// the run's window (`--max-seq-len` = dataset.max_seq_len), bit for bit: the same function on
/// the same weights, without dropout though the run trains with it. One eval record is longer
/// than the window, so the windowed path is part of it.
#[test]
fn eval_loss_at_step_n_is_tune_eval_of_checkpoint_n() {
    let (root, recipe) = setup("equal", 5e-3, "");
    let out =
        Command::new(env!("CARGO_BIN_EXE_tune")).args(["run", s(&recipe), "train.max_steps=8"]).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The CLI says what it evaluated, how the long record was windowed, and the best.
    assert!(stderr.contains("eval step 2: loss") && stderr.contains("1 of 7 records longer than 32 tokens"), "{stderr}");
    assert!(stderr.contains("best") && stderr.contains("checkpoints/best"), "{stderr}");
    let m = metrics::read(&root.join("run/metrics.jsonl")).unwrap();
    let logged = evals(&m);
    assert_eq!(logged.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 4, 6, 8], "every 2 steps and the last");
    assert!(logged[0].1 != logged[3].1, "training moves the eval loss");
    for (step, loss) in &logged {
        let ckpt = root.join(format!("run/checkpoints/step_{step:06}"));
        let out = Command::new(env!("CARGO_BIN_EXE_tune"))
            .args(["eval", "--model", s(&root.join("model")), "--data", s(&root.join("eval.jsonl"))])
            .args(["--adapter", s(&ckpt), "--max-seq-len", "32", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = v["loss"].as_f64().unwrap();
        assert_eq!(v["windowed_records"].as_u64(), Some(1));
        assert!((loss - want).abs() <= 1e-6 * want, "step {step}: logged {loss} vs tune eval {want}");
        assert_eq!(loss.to_bits(), want.to_bits(), "step {step}: logged {loss} vs tune eval {want}");
        // The checkpoint's trainer_state records the evaluation it follows.
        let state = checkpoint::open(&ckpt).unwrap().state.eval.unwrap();
        assert_eq!((state.last_step, state.last_loss), (Some(*step), Some(*loss)));
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// dataset.eval_split holds out round(n · fraction) records drawn with train.seed: the same on
/// every call, others with another seed, disjoint from the training examples, together all of
/// the file, the training ones in file order.
#[test]
fn eval_split_is_deterministic_and_disjoint() {
    let root = temp("split");
    write_tiny_model(&root.join("model"), 3);
    write_distinct(&root.join("data.jsonl"), 40, 0);
    let text = format!(
        "model:\n  path: {r}/model\ndataset:\n  path: {r}/data.jsonl\n  eval_split: 0.2\noutput:\n  dir: {r}/run\n",
        r = root.display()
    );
    let recipe = root.join("recipe.yaml");
    std::fs::write(&recipe, text).unwrap();
    let load = |seed: u64| {
        let r = Recipe::load(&recipe, &[format!("train.seed={seed}")]).unwrap();
        train::setup(&r, tune::hf::ChatDate::today()).unwrap()
    };
    let (a, b, c) = (load(7), load(7), load(8));
    let ids = |ex: &[Example]| ex.iter().map(|e| e.ids.clone()).collect::<Vec<_>>();
    let eval_a = ids(&a.data.eval.as_ref().unwrap().examples);
    assert_eq!(eval_a.len(), 8, "round(40 · 0.2)");
    assert_eq!(eval_a, ids(&b.data.eval.as_ref().unwrap().examples), "same seed, same split");
    assert_ne!(eval_a, ids(&c.data.eval.as_ref().unwrap().examples), "the seed draws the split");
    let train_a: Vec<Vec<u32>> = a.data.rows.iter().map(|r| r.ids.clone()).collect();
    assert_eq!(train_a.len(), 32);
    assert!(eval_a.iter().all(|e| !train_a.contains(e)), "disjoint");
    // Together they are the file; the training rows keep the file's order.
    let held = train::data::holdout(40, 0.2, 7);
    let tok = tune::hf::Tokenizer::from_model_dir(&root.join("model")).unwrap();
    let all: Vec<Vec<u32>> = tune::data::read_records(&root.join("data.jsonl"))
        .unwrap()
        .iter()
        .map(|r| tune::data::text_ids(&tok, r.value["text"].as_str().unwrap(), tok.eos_token_id()).unwrap())
        .collect();
    let (want_eval, want_train): (Vec<_>, Vec<_>) = all.into_iter().zip(held).partition(|(_, h)| *h);
    assert_eq!(eval_a, want_eval.into_iter().map(|(x, _)| x).collect::<Vec<_>>());
    assert_eq!(train_a, want_train.into_iter().map(|(x, _)| x).collect::<Vec<_>>());
    // A split that leaves nothing to train on names the key.
    write_distinct(&root.join("data.jsonl"), 1, 0);
    let r = Recipe::load(&recipe, &[]).unwrap();
    let err = train::setup(&r, tune::hf::ChatDate::today()).err().unwrap().to_string();
    assert!(err.contains("dataset.eval_split") && err.contains("none to train on"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// A high learning rate: the eval loss falls, then rises. save_best keeps the step of the
/// lowest logged eval loss as checkpoints/best, the same adapter as that step's checkpoint, and
/// early stopping with patience P stops at the first step where P evaluations in a row have not
/// improved on the best, with what it logged identical to the run without early stopping.
#[test]
fn save_best_and_early_stopping_follow_the_logged_eval_losses() {
    let (root, recipe) = setup("best", 3e-2, "");
    let mut rec = Recorder::default();
    let summary = train_in_process(&recipe, &[], Start::Fresh, &mut rec);
    assert!(summary.stopped_early.is_none());
    let run = root.join("run");
    let m = metrics::read(&run.join("metrics.jsonl")).unwrap();
    let logged = evals(&m);
    assert_eq!(logged, rec.evals, "the observer saw what metrics.jsonl holds");
    assert_eq!(logged.len(), 12);
    let (best_step, best) = logged.iter().copied().fold((0, f64::INFINITY), |b, e| if e.1 < b.1 { e } else { b });
    assert!(best_step < 24 && logged.last().unwrap().1 > best, "the case needs an eval loss that rises again: {logged:?}");

    let kept = checkpoint::open(&checkpoint::best_dir(&run)).unwrap();
    assert_eq!(kept.state.step, best_step);
    let e = kept.state.eval.as_ref().unwrap();
    assert_eq!((e.best_step, e.best_loss, e.last_loss), (Some(best_step), Some(best), Some(best)));
    let adapter = |dir: &Path| std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&kept.dir), adapter(&run.join(format!("checkpoints/step_{best_step:06}"))));
    // Never pruned: keep_last counts step checkpoints only.
    let mut rec = Recorder::default();
    train_in_process(&recipe, &["output.keep_last=1"], Start::Overwrite, &mut rec);
    assert_eq!(checkpoint::list(&run).len(), 1);
    assert_eq!(checkpoint::open(&checkpoint::best_dir(&run)).unwrap().state.step, best_step);

    // Early stopping: where the patience says, from the losses above.
    eprintln!("eval losses: {logged:?}");
    let mut tested = 0;
    for patience in [1usize, 2, 3] {
        let mut bad = 0;
        let mut low = f64::INFINITY;
        let stop = logged.iter().find_map(|&(step, l)| {
            if l < low {
                low = l;
                bad = 0;
            } else {
                bad += 1;
            }
            (bad >= patience && step < 24).then_some(step)
        });
        let Some(stop) = stop else { continue };
        let mut rec = Recorder::default();
        let p = format!("train.early_stopping_patience={patience}");
        let summary = train_in_process(&recipe, &[&p], Start::Overwrite, &mut rec);
        let got = metrics::read(&run.join("metrics.jsonl")).unwrap();
        assert_eq!(got.len(), stop, "patience {patience}");
        assert_eq!(evals(&got), logged.iter().copied().take_while(|e| e.0 <= stop).collect::<Vec<_>>());
        let reason = summary.stopped_early.expect("stopped early");
        assert!(reason.contains("early stopping") && reason.contains(&format!("step {}", summary.eval.unwrap().best_step.unwrap())));
        assert_eq!(rec.stopped.as_ref().map(|s| s.0), Some(stop));
        assert!(run.join("adapter/adapter_model.safetensors").is_file(), "an early-stopped run leaves its adapter");
        assert_eq!(checkpoint::list(&run).last().unwrap().state.step, stop);
        tested += 1;
    }
    assert!(tested >= 2, "the case should stop early for most patiences");
    let _ = std::fs::remove_dir_all(&root);
}

/// Interrupted between two evaluations after a non-improving one, then resumed: the same
/// metrics (training and eval losses, bit for bit), the same best checkpoint, and early stopping
/// at the same step, since the best loss, the patience counter and the schedule are in the
/// checkpoint.
#[test]
fn interrupted_and_resumed_run_has_the_same_evals_best_and_stop() {
    let (root, recipe) = setup("resume", 3e-2, "  early_stopping_patience: 3\n");
    let run = root.join("run");
    let mut rec = Recorder::default();
    let reference = train_in_process(&recipe, &[], Start::Fresh, &mut rec);
    let want = metrics::read(&run.join("metrics.jsonl")).unwrap();
    let want_best = checkpoint::open(&checkpoint::best_dir(&run)).unwrap();
    let stop = reference.steps;
    let ref_state = reference.eval.clone().unwrap();
    // A step after an evaluation that did not improve, before the stop: the counter is > 0 there.
    let mut low = f64::INFINITY;
    let mut interrupt_at = None;
    for (step, l) in evals(&want) {
        if l < low {
            low = l;
        } else {
            if interrupt_at.is_none() && step + 1 < stop {
                interrupt_at = Some(step + 1);
            }
        }
    }
    let k = interrupt_at.expect("an eval that did not improve before the stop");
    assert!(k % 2 == 1, "between two evaluations");

    let mut rec = Recorder { stop_after: Some(k), ..Default::default() };
    let summary = train_in_process(&recipe, &[], Start::Overwrite, &mut rec);
    assert!(summary.interrupted.is_some());
    assert_eq!(metrics::read(&run.join("metrics.jsonl")).unwrap().len(), k);
    assert!(checkpoint::list(&run).last().unwrap().state.eval.as_ref().unwrap().bad_evals > 0);

    let mut rec = Recorder::default();
    let resumed = train_in_process(&recipe, &[], Start::Resume(None), &mut rec);
    let got = metrics::read(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.loss.to_bits(), w.loss.to_bits(), "step {}", g.step);
        assert_eq!(g.eval_loss.map(f64::to_bits), w.eval_loss.map(f64::to_bits), "step {}", g.step);
    }
    assert_eq!(resumed.steps, stop);
    assert_eq!(resumed.stopped_early, reference.stopped_early);
    assert_eq!(resumed.eval.unwrap(), ref_state);
    let best = checkpoint::open(&checkpoint::best_dir(&run)).unwrap();
    assert_eq!(best.state.step, want_best.state.step);
    assert_eq!(best.state.eval, want_best.state.eval);
    let adapter = |dir: &Path| std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&best.dir), adapter(&want_best.dir));

    // Resuming the early-stopped run again trains nothing more.
    let mut rec = Recorder::default();
    let again = train_in_process(&recipe, &[], Start::Resume(None), &mut rec);
    assert_eq!((again.steps, rec.done), (stop, 0));
    assert!(again.stopped_early.is_some());
    let _ = std::fs::remove_dir_all(&root);
}

/// The windowed loss against transformers, following the "Perplexity of fixed-length models"
/// guide's loop (tests/fixtures/windowed_eval_reference.py), on a 300-token record for the tiny
/// Llama (RoPE) and GPT-2 (learned positions: 128 of them, so the record cannot be one pass),
/// with and without a prompt mask; the token and window counts exactly.
#[test]
fn windowed_eval_matches_transformers_perplexity_guide() {
    let reference = json("windowed_eval.json");
    let device = Default::default();
    for name in ["llama", "gpt2"] {
        let r = &reference[name];
        let model: tune::model::CausalLm<B> = tune::model::load(&tiny(name), &device).unwrap();
        assert_eq!(model.config.max_position_embeddings as u64, r["max_position_embeddings"].as_u64().unwrap());
        let ids = ids(&r["ids"]);
        assert!(ids.len() > model.config.max_position_embeddings);
        let prompt = r["prompt"].as_u64().unwrap() as usize;
        for case in r["cases"].as_array().unwrap() {
            let (len, stride) = (case["window"].as_u64().unwrap() as usize, case["stride"].as_u64().unwrap() as usize);
            let masked = case["masked"].as_bool().unwrap();
            let trained: Vec<bool> = (0..ids.len()).map(|i| !masked || i >= prompt).collect();
            let ex = Example { ids: ids.clone(), trained };
            let report = evaluate_examples(&model, &[ex], Some(Window::new(len, Some(stride)).unwrap()), &device);
            let want = case["loss"].as_f64().unwrap();
            let rel = (report.loss - want).abs() / want;
            eprintln!("{name} window {len} stride {stride} masked {masked}: {} vs transformers {want} (rel {rel:.1e})", report.loss);
            assert!(rel <= 1e-6, "{name} {len}/{stride} masked {masked}: {} vs {want}", report.loss);
            assert_eq!(report.tokens as u64, case["tokens"].as_u64().unwrap());
            assert_eq!(report.windows as u64, case["windows"].as_u64().unwrap());
            assert_eq!((report.records, report.windowed_records), (1, 1));
        }
    }
}

/// `tune eval` on a record longer than the model's positions: windows of the context by
/// default (half of it as stride), or of --max-seq-len with --stride; it says how it windowed,
/// and gives the library's number for the same window.
#[test]
fn tune_eval_windows_long_records_and_says_so() {
    let root = temp("long");
    write_tiny_model(&root.join("model"), 4);
    let data = root.join("long.jsonl");
    let long = ["hello world held red door"; 30].join(" ");
    std::fs::write(&data, format!("{}\n{}\n", serde_json::json!({"text": long}), serde_json::json!({"text": "hello"}))).unwrap();
    let tok = tune::hf::Tokenizer::from_model_dir(&root.join("model")).unwrap();
    let long_ids = tune::data::text_ids(&tok, &long, tok.eos_token_id()).unwrap();
    assert!(long_ids.len() > 256, "longer than the tiny model's 256 positions: {}", long_ids.len());
    let short_ids = tune::data::text_ids(&tok, "hello", tok.eos_token_id()).unwrap();
    let model: tune::model::CausalLm<B> = tune::model::load(&root.join("model"), &Default::default()).unwrap();
    let short_len = short_ids.len();
    let examples: Vec<Example> =
        [long_ids.clone(), short_ids].into_iter().map(|ids| Example { trained: vec![true; ids.len()], ids }).collect();
    for (flags, len, stride) in [(vec![], 256, 128), (vec!["--max-seq-len", "64", "--stride", "16"], 64, 16)] {
        let out = Command::new(env!("CARGO_BIN_EXE_tune"))
            .args(["eval", "--model", s(&root.join("model")), "--data", s(&data), "--json"])
            .args(&flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = evaluate_examples(&model, &examples, Some(Window::new(len, Some(stride)).unwrap()), &Default::default());
        let windows = Window::new(len, Some(stride)).unwrap().spans(long_ids.len()).len();
        assert_eq!(v["loss"].as_f64().unwrap(), want.loss, "{flags:?}");
        assert_eq!(v["windows"].as_u64().unwrap() as usize, windows + 1, "{flags:?}");
        assert_eq!(v["tokens"].as_u64().unwrap() as usize, long_ids.len() - 1 + short_len - 1, "{flags:?}: each token once");
        let says =
            format!("1 of 2 records are longer than the window of {len} tokens: scored in {} windows (stride {stride})", windows + 1);
        assert!(stderr.contains(&says), "{stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tune"))
        .args(["eval", "--model", s(&root.join("model")), "--data", s(&data), "--max-seq-len", "64", "--stride", "65"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--stride 65"));
    let _ = std::fs::remove_dir_all(&root);
}

/// Alpaca data: the run's eval loss covers the responses only, as training masks them, and
/// equals `tune eval --format alpaca` on the checkpoint (and differs from --train-on-input).
#[test]
fn alpaca_eval_loss_is_tune_eval_format_alpaca() {
    let root = temp("alpaca");
    write_tiny_model(&root.join("model"), 6);
    let words = ["hello", "world", "hold", "lord", "herd", "roll", "wheel", "door", "red", "owl"];
    let record = |i: usize| {
        serde_json::json!({"instruction": format!("{} {}", words[i % 10], words[(i / 10) % 10]), "output": words[(i * 7) % 10]}).to_string()
    };
    std::fs::write(root.join("train.jsonl"), (0..16).map(record).collect::<Vec<_>>().join("\n")).unwrap();
    std::fs::write(root.join("eval.jsonl"), (40..45).map(record).collect::<Vec<_>>().join("\n")).unwrap();
    let recipe = root.join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "model:\n  path: {r}/model\nlora:\n  rank: 4\n  alpha: 8\n  dropout: 0.1\n\
             dataset:\n  path: {r}/train.jsonl\n  eval_path: {r}/eval.jsonl\n  format: alpaca\n  max_seq_len: 256\n\
             train:\n  max_steps: 2\n  batch_size: 2\n  lr: 1.0e-2\n  eval_every: 2\noutput:\n  dir: {r}/run\n  export: none\n",
            r = root.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tune")).args(["run", s(&recipe)]).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let logged = evals(&metrics::read(&root.join("run/metrics.jsonl")).unwrap());
    assert_eq!(logged.len(), 1);
    let eval = |extra: &[&str]| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_tune"))
            .args(["eval", "--model", s(&root.join("model")), "--data", s(&root.join("eval.jsonl")), "--format", "alpaca"])
            .args(["--adapter", s(&root.join("run/checkpoints/step_000002")), "--max-seq-len", "256", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let responses = eval(&[]);
    assert_eq!(responses["loss"].as_f64().unwrap().to_bits(), logged[0].1.to_bits());
    let all = eval(&["--train-on-input"]);
    assert!(all["tokens"].as_u64().unwrap() > 3 * responses["tokens"].as_u64().unwrap(), "the prompt is most of each record");
    assert_ne!(all["loss"].as_f64(), responses["loss"].as_f64());
    let _ = std::fs::remove_dir_all(&root);
}
