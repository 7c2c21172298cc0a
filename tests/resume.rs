//! Checkpoints and exact resume: a run interrupted by Ctrl-C (SIGINT) or killed with SIGKILL and
//! then resumed writes the same per-step metrics as an uninterrupted run, bit for bit on CPU,
//! with shuffling, LoRA dropout and gradient accumulation on.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tune::train::metrics::{self, StepMetrics};

const STEPS: usize = 300;

struct Setup {
    root: PathBuf,
    recipe: PathBuf,
}

fn setup(tag: &str) -> Setup {
    let root = std::env::temp_dir().join(format!("tune-resume-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    write_tiny_model(&root.join("model"), 3);
    write_text_dataset(&root.join("data.jsonl"), 37, 5);
    let recipe = root.join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "model:\n  path: {root}/model\nlora:\n  rank: 4\n  alpha: 8\n  dropout: 0.1\n  target_modules: all-linear\n\
             dataset:\n  path: {root}/data.jsonl\n  max_seq_len: 32\n  shuffle: true\n\
             train:\n  max_steps: {STEPS}\n  batch_size: 2\n  grad_accum: 2\n  lr: 5.0e-3\n  warmup_steps: 10\n  seed: 11\n\
             output:\n  dir: {root}/run\n  save_every: 25\n  keep_last: 2\n",
            root = root.display()
        ),
    )
    .unwrap();
    Setup { root, recipe }
}

fn tune(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tune"));
    c.args(args).stdin(Stdio::null());
    c
}

fn run_to_end(recipe: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["run", recipe.to_str().unwrap()];
    args.extend_from_slice(extra);
    tune(&args).output().unwrap()
}

fn read_metrics(run: &Path) -> Vec<StepMetrics> {
    metrics::read(&run.join("metrics.jsonl")).unwrap()
}

/// The uninterrupted reference run's metrics (computed once per test, in its own directory).
fn reference(tag: &str) -> Vec<StepMetrics> {
    let s = setup(&format!("ref-{tag}"));
    let out = run_to_end(&s.recipe, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = read_metrics(&s.root.join("run"));
    let _ = std::fs::remove_dir_all(&s.root);
    m
}

/// Starts a run and stops it with `signal` once `lines` steps are logged.
fn interrupt(s: &Setup, signal: &str, lines: usize) -> std::process::Output {
    let child = tune(&["run", s.recipe.to_str().unwrap()]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let metrics = s.root.join("run/metrics.jsonl");
    let start = Instant::now();
    loop {
        let n = std::fs::read_to_string(&metrics).map(|t| t.lines().count()).unwrap_or(0);
        if n >= lines {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the run never reached {lines} steps");
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    child.wait_with_output().unwrap()
}

/// The number of points of each line in a run's report.svg, parsed as XML.
fn report_lines(run: &Path) -> Vec<usize> {
    let text = std::fs::read_to_string(run.join("report.svg")).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("report.svg is well-formed XML");
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .map(|n| n.attribute("points").unwrap_or_default().split_whitespace().count())
        .collect()
}

fn same_steps(got: &[StepMetrics], want: &[StepMetrics]) {
    assert_eq!(got.len(), want.len(), "number of steps");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.step, w.step);
        assert_eq!(g.loss.to_bits(), w.loss.to_bits(), "step {}: loss {} vs {}", g.step, g.loss, w.loss);
        assert_eq!(g.grad_norm.to_bits(), w.grad_norm.to_bits(), "step {}: grad norm", g.step);
        assert_eq!(g.lr.to_bits(), w.lr.to_bits(), "step {}: lr", g.step);
        assert_eq!(g.tokens, w.tokens, "step {}: tokens", g.step);
    }
}

#[test]
fn sigint_then_resume_is_bit_identical() {
    let want = reference("sigint");
    assert!(want.first().unwrap().loss > want.last().unwrap().loss, "the reference run should learn");
    let s = setup("sigint");
    let out = interrupt(&s, "-INT", 40);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "tells how to resume: {stderr}");
    let partial = read_metrics(&s.root.join("run"));
    assert!(partial.len() < STEPS, "the interrupt came too late to test anything");
    // The checkpoint is at the step the interrupt finished.
    let last = tune::train::checkpoint::list(&s.root.join("run")).pop().unwrap();
    assert_eq!(last.state.step, partial.len());

    let out = run_to_end(&s.recipe, &["--resume"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    same_steps(&read_metrics(&s.root.join("run")), &want);
    let _ = std::fs::remove_dir_all(&s.root);
}

#[test]
fn sigkill_then_resume_is_bit_identical_and_logs_each_step_once() {
    let want = reference("sigkill");
    let s = setup("sigkill");
    let out = interrupt(&s, "-KILL", 60);
    assert_ne!(out.status.code(), Some(0));
    let run = s.root.join("run");
    let logged = read_metrics(&run).len();
    let found = tune::train::checkpoint::list(&run);
    assert!(found.len() <= 2, "keep_last: 2");
    let resume_step = found.last().expect("a periodic checkpoint exists").state.step;
    assert!(resume_step <= logged && resume_step.is_multiple_of(25));

    let out = run_to_end(&s.recipe, &["--resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("step {resume_step} of {STEPS}")), "{stderr}");
    same_steps(&read_metrics(&run), &want);
    // The report is drawn from the whole history, the steps before the kill included: one line
    // of every step for each of train loss, learning rate, gradient norm and tokens/s (the
    // axes and ticks are two-point lines).
    assert_eq!(report_lines(&run).iter().filter(|&&n| n == STEPS).count(), 4, "{:?}", report_lines(&run));
    let _ = std::fs::remove_dir_all(&s.root);
}

#[test]
fn resume_guards() {
    let s = setup("guards");
    let out = run_to_end(&s.recipe, &["train.max_steps=50"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = s.root.join("run");

    // A fresh start in a directory that holds a run is refused.
    let out = run_to_end(&s.recipe, &["train.max_steps=50"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));

    // A recipe change that alters the run is refused, naming the keys.
    let out = run_to_end(&s.recipe, &["train.max_steps=50", "train.lr=1.0e-3", "lora.rank=8", "--resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("train.lr") && stderr.contains("lora.rank"), "{stderr}");

    // Changing what only affects output or memory is fine; a damaged latest checkpoint is
    // skipped.
    let latest = tune::train::checkpoint::list(&run).pop().unwrap();
    assert_eq!(latest.state.step, 50);
    std::fs::remove_file(latest.dir.join(".complete")).unwrap();
    let out = run_to_end(&s.recipe, &["train.max_steps=50", "output.keep_last=5", "train.activation_checkpointing=true", "--resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning: skipping") && stderr.contains("step 25 of 50"), "{stderr}");
    assert_eq!(read_metrics(&run).len(), 50);

    // The dataset's content is part of the run.
    std::fs::write(s.root.join("data.jsonl"), "{\"text\": \"hello world\"}\n").unwrap();
    let out = run_to_end(&s.recipe, &["train.max_steps=50", "--resume"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("dataset"));
    let _ = std::fs::remove_dir_all(&s.root);
}
