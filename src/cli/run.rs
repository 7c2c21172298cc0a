use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use tune::recipe::Recipe;
use tune::train::metrics::StepMetrics;
use tune::train::{self, Observer};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A recipe file (see `tune ls` for the built-in ones).
    recipe: PathBuf,
    /// Overrides, typed by the schema: train.lr=1e-4 lora.target_modules=[q_proj,v_proj] ...
    overrides: Vec<String>,
    /// Replace a previous run in output.dir.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Continue from the latest complete checkpoint in output.dir, or from the checkpoint given.
    #[arg(long, num_args = 0..=1, value_name = "CHECKPOINT")]
    resume: Option<Option<PathBuf>>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let recipe = Recipe::load(&args.recipe, &args.overrides)?;
    let start = match (&args.resume, args.overwrite) {
        (Some(path), _) => train::Start::Resume(path.as_deref().map(tune::recipe::resolve)),
        (None, true) => train::Start::Overwrite,
        (None, false) => train::Start::Fresh,
    };
    let mut progress = Progress::new();
    // First Ctrl-C: finish the current step, checkpoint, exit 130. Second: exit at once.
    let stop = progress.stop.clone();
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to quit at once)");
    })?;
    if let Some(caches) = tune::backend::cubecl_config::configure(recipe.device)? {
        eprintln!("GPU kernel caches for {}: {}", caches.gpu, caches.dir.display());
    }
    let summary = match recipe.device {
        tune::backend::DeviceKind::Cpu => train::train::<tune::backend::Cpu>(&recipe, start, &mut progress)?,
        #[cfg(feature = "cuda")]
        tune::backend::DeviceKind::Cuda => train::train::<tune::backend::Cuda>(&recipe, start, &mut progress)?,
        #[cfg(feature = "wgpu")]
        tune::backend::DeviceKind::Wgpu => train::train::<tune::backend::Wgpu>(&recipe, start, &mut progress)?,
        #[allow(unreachable_patterns)]
        kind => return Err(kind.check_available().expect_err("a device without its feature").into()),
    };
    if let Some(checkpoint) = summary.interrupted {
        let mut cmd = format!("tune run {}", args.recipe.display());
        for o in &args.overrides {
            cmd += &format!(" {o}");
        }
        eprintln!("stopped after step {}; checkpoint {}", summary.steps, checkpoint.display());
        eprintln!("resume with: {cmd} --resume");
        std::process::exit(130);
    }
    let dir = recipe.output.dir.display();
    if let Some(reason) = &summary.stopped_early {
        eprintln!("stopped after step {} of {}: {reason}", summary.steps, progress.total);
    }
    if let Some(e) = &summary.eval {
        if let (Some(step), Some(loss), Some(best_step), Some(best)) = (e.last_step, e.last_loss, e.best_step, e.best_loss) {
            let kept = if recipe.output.save_best { format!(", kept as {dir}/checkpoints/best") } else { String::new() };
            eprintln!("eval loss {loss:.6} at step {step}; best {best:.6} at step {best_step}{kept}");
        }
    }
    eprintln!(
        "done: {} steps, final loss {:.4}, {} tokens in {:.1} s ({:.1} tokens/s)",
        summary.steps,
        summary.final_loss,
        summary.tokens,
        summary.elapsed_s,
        summary.tokens as f64 / summary.elapsed_s
    );
    eprintln!(
        "adapter:  {dir}/adapter   (try: tune generate --model {} --adapter {dir}/adapter --prompt ...)",
        recipe.model.path.display()
    );
    eprintln!("metrics:  {dir}/metrics.jsonl, plotted in {dir}/report.svg");
    use tune::recipe::ExportKind;
    let out = &recipe.output;
    let (adapter, merged) = match out.export {
        ExportKind::Adapter => (true, false),
        ExportKind::Merged => (false, true),
        ExportKind::Both => (true, true),
        ExportKind::None | ExportKind::Gguf => (false, false),
    };
    if adapter || merged {
        let src = tune::export::resolve_source(&out.dir)?;
        let opts =
            tune::export::Options { dtype: out.export_dtype, base: Some(recipe.model.path.clone()), base_name: None, overwrite: true };
        let export_dir = out.dir.join("export");
        super::export::export(
            &src,
            adapter.then(|| export_dir.join("adapter")).as_deref(),
            merged.then(|| export_dir.join("merged")).as_deref(),
            5_000_000_000,
            &opts,
        )?;
    }
    if out.export == ExportKind::Gguf {
        let src = tune::export::resolve_source(&out.dir)?;
        let opts = tune::export::Options { base: Some(recipe.model.path.clone()), overwrite: true, ..Default::default() };
        let path = out.dir.join("export/model.gguf");
        let w = tune::export::export_gguf(&src, &path, &opts, &Default::default())?;
        eprintln!("gguf ({}, q8_0) -> {}: {} tensors", w.arch, w.path.display(), w.tensors);
    }
    Ok(())
}

pub fn validate(recipe_path: &Path, overrides: &[String]) -> anyhow::Result<()> {
    let recipe = Recipe::load(recipe_path, overrides)?;
    let setup = train::setup(&recipe, tune::hf::ChatDate::today())?;
    let c = &setup.config;
    // Trainable parameters from shapes alone: r·(in + out) per adapted layer, and DoRA's out.
    let dora = usize::from(setup.lora.use_dora);
    let trainable: usize = c
        .linears()
        .iter()
        .filter(|l| setup.lora.targets(&l.path))
        .map(|l| setup.lora.rank * (l.in_features + l.out_features) + dora * l.out_features)
        .sum();
    print!("{}", recipe.to_yaml());
    println!("# model: {} ({}, {:.1}M parameters)", recipe.model.path.display(), c.family().name(), c.num_parameters() as f64 / 1e6);
    let d = &setup.data;
    println!("# dataset: {} examples, {} rows, {} label tokens", d.examples, d.rows.len(), d.label_tokens);
    let max_seq_len = recipe.dataset.max_seq_len;
    let order = d.order(recipe.dataset.shuffle, recipe.train.seed);
    for (i, s) in d.sources.iter().enumerate() {
        let l = &s.lengths;
        let share = match (&d.weights, order.counts()) {
            (Some(w), Some(c)) => format!(", weight {}: {} rows an epoch", w[i], c[i]),
            _ => String::new(),
        };
        println!("# {}: {} records ({}), {} rows{share}", s.path.display(), s.records, format_name(s.format), s.rows);
        println!(
            "#   tokens per record: min {}, median {}, p90 {}, p99 {}, max {} (before truncation)",
            l.min, l.median, l.p90, l.p99, l.max
        );
        println!("#   truncated at max_seq_len {max_seq_len}: {}; no labelled token left (skipped): {}", s.truncated, s.skipped);
    }
    if let Some(e) = &d.eval {
        let labels: usize = e.examples.iter().map(|x| x.label_count()).sum();
        println!("# eval set: {} examples ({}), {labels} label tokens", e.examples.len(), e.source);
    }
    println!("# trainable parameters: {trainable} ({:.3}% of the model)", 100.0 * trainable as f64 / c.num_parameters() as f64);
    println!("# optimizer steps: {}", setup.total_steps);
    println!("recipe OK");
    Ok(())
}

/// A format's name as the recipe writes it.
fn format_name(f: tune::recipe::DataFormat) -> String {
    serde_yaml::to_string(&f).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// An indicatif bar on a terminal; plain log lines otherwise (CI logs, files).
struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    stop: Arc<AtomicBool>,
    /// The latest eval loss and the best so far, shown beside the training loss.
    eval: Option<(f64, f64)>,
}

impl Progress {
    fn new() -> Self {
        Progress { bar: None, total: 0, stop: Arc::new(AtomicBool::new(false)), eval: None }
    }

    fn println(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Observer for Progress {
    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn checkpoint(&mut self, dir: &Path, bytes: u64, seconds: f64) {
        self.println(format!("checkpoint {} ({:.1} MB, {seconds:.2} s)", dir.display(), bytes as f64 / 1e6));
    }

    fn skipped_checkpoint(&mut self, why: &tune::Error) {
        self.println(format!("warning: skipping {why}"));
    }

    fn resumed(&mut self, dir: &Path, step: usize, total: usize) {
        self.println(format!("resuming from {} (step {step} of {total})", dir.display()));
    }

    fn eval(&mut self, step: usize, report: &tune::eval::EvalReport, state: &tune::train::checkpoint::EvalState) {
        let best = state.best_loss.unwrap_or(report.loss);
        let mark = if state.best_step == Some(step) {
            " (best)".to_string()
        } else {
            format!(" (best {best:.4} at step {})", state.best_step.unwrap_or(0))
        };
        let mut line = format!("eval step {step}: loss {:.4}{mark} over {} tokens", report.loss, report.tokens);
        if report.windowed_records > 0 {
            line += &format!(
                "; {} of {} records longer than {} tokens, in {} windows (stride {})",
                report.windowed_records,
                report.records,
                report.window.unwrap_or(0),
                report.windows,
                report.stride.unwrap_or(0)
            );
        }
        self.println(line);
        self.eval = Some((report.loss, best));
    }

    fn stopped_early(&mut self, step: usize, reason: &str) {
        self.println(format!("step {step}: {reason}"));
    }

    fn dataset(&mut self, data: &tune::train::data::Prepared) {
        for s in &data.sources {
            if s.skipped > 0 {
                eprintln!(
                    "{}: skipped {} of {} records with no labelled token left after truncation (dataset.max_seq_len)",
                    s.path.display(),
                    s.skipped,
                    s.records
                );
            }
        }
    }

    fn start(&mut self, first: usize, total: usize) {
        self.total = total;
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            bar.set_position(first as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]").expect("valid template"),
            );
            self.bar = Some(bar);
        }
    }

    fn step(&mut self, m: &StepMetrics) {
        let mut msg = format!("loss {:.4} lr {:.2e} {:.0} tok/s", m.loss, m.lr, m.tokens_per_s);
        if let Some((eval, best)) = self.eval {
            msg += &format!(" eval {eval:.4} (best {best:.4})");
        }
        match &self.bar {
            Some(bar) => {
                bar.set_message(msg);
                bar.set_position(m.step as u64);
            }
            None => {
                let every = (self.total / 50).max(1);
                if m.step.is_multiple_of(every) || m.step == self.total || m.step == 1 || m.eval_loss.is_some() {
                    eprintln!("step {}/{} {msg} grad_norm {:.3} elapsed {:.1}s", m.step, self.total, m.grad_norm, m.elapsed_s);
                }
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
