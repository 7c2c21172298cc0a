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
    let summary = match recipe.device {
        tune::backend::DeviceKind::Cpu => train::train::<tune::backend::Cpu>(&recipe, start, &mut progress)?,
        #[cfg(feature = "cuda")]
        tune::backend::DeviceKind::Cuda => train::train::<tune::backend::Cuda>(&recipe, start, &mut progress)?,
        #[cfg(not(feature = "cuda"))]
        tune::backend::DeviceKind::Cuda => unreachable!("setup refuses cuda without the feature"),
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
        ExportKind::None => (false, false),
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
    println!("# model: {} ({}, {:.1}M parameters)", recipe.model.path.display(), c.family.name(), c.num_parameters() as f64 / 1e6);
    println!(
        "# dataset: {} examples ({:?}), {} rows, {} label tokens",
        setup.data.examples,
        setup.data.format,
        setup.data.rows.len(),
        setup.data.label_tokens
    );
    println!("# trainable parameters: {trainable} ({:.3}% of the model)", 100.0 * trainable as f64 / c.num_parameters() as f64);
    println!("# optimizer steps: {}", setup.total_steps);
    println!("recipe OK");
    Ok(())
}

/// An indicatif bar on a terminal; plain log lines otherwise (CI logs, files).
struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    stop: Arc<AtomicBool>,
}

impl Progress {
    fn new() -> Self {
        Progress { bar: None, total: 0, stop: Arc::new(AtomicBool::new(false)) }
    }
}

impl Observer for Progress {
    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn checkpoint(&mut self, dir: &Path, bytes: u64, seconds: f64) {
        let line = format!("checkpoint {} ({:.1} MB, {seconds:.2} s)", dir.display(), bytes as f64 / 1e6);
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
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
        let msg = format!("loss {:.4} lr {:.2e} {:.0} tok/s", m.loss, m.lr, m.tokens_per_s);
        match &self.bar {
            Some(bar) => {
                bar.set_message(msg);
                bar.set_position(m.step as u64);
            }
            None => {
                let every = (self.total / 50).max(1);
                if m.step.is_multiple_of(every) || m.step == self.total || m.step == 1 {
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
