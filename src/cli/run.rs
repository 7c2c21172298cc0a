use std::io::IsTerminal;
use std::path::{Path, PathBuf};

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
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let recipe = Recipe::load(&args.recipe, &args.overrides)?;
    let mut progress = Progress::new();
    let summary = match recipe.device {
        tune::backend::DeviceKind::Cpu => train::train::<tune::backend::Cpu>(&recipe, args.overwrite, &mut progress)?,
        #[cfg(feature = "cuda")]
        tune::backend::DeviceKind::Cuda => train::train::<tune::backend::Cuda>(&recipe, args.overwrite, &mut progress)?,
        #[cfg(not(feature = "cuda"))]
        tune::backend::DeviceKind::Cuda => unreachable!("setup refuses cuda without the feature"),
    };
    let dir = recipe.output.dir.display();
    eprintln!(
        "done: {} steps, final loss {:.4}, {} tokens in {:.1} s ({:.1} tokens/s)",
        summary.steps,
        summary.final_loss,
        summary.tokens,
        summary.elapsed_s,
        summary.tokens as f64 / summary.elapsed_s
    );
    eprintln!("adapter:  {dir}/adapter   (try: tune generate --model {} --adapter {dir}/adapter --prompt ...)", recipe.model.path.display());
    eprintln!("metrics:  {dir}/metrics.jsonl, loss curve {dir}/loss.svg");
    Ok(())
}

pub fn validate(recipe_path: &Path, overrides: &[String]) -> anyhow::Result<()> {
    let recipe = Recipe::load(recipe_path, overrides)?;
    let setup = train::setup(&recipe)?;
    let c = &setup.config;
    // Trainable parameters from shapes alone: r·(in + out) per adapted projection.
    let (h, q, kv, ffn) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size);
    let per_layer: usize = setup
        .lora
        .target_modules
        .iter()
        .map(|t| match t.as_str() {
            "q_proj" => h + q,
            "k_proj" | "v_proj" => h + kv,
            "o_proj" => q + h,
            _ => h + ffn,
        })
        .sum();
    let trainable = setup.lora.rank * per_layer * c.num_hidden_layers;
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
}

impl Progress {
    fn new() -> Self {
        Progress { bar: None, total: 0 }
    }
}

impl Observer for Progress {
    fn start(&mut self, total: usize) {
        self.total = total;
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
                    .expect("valid template"),
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
                if m.step % every == 0 || m.step == self.total || m.step == 1 {
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
