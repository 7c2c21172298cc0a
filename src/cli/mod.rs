//! The `tune` command line: one function per verb. anyhow lives here and in main.rs only.

mod bench;
mod eval;
mod export;
mod generate;
mod inspect;
mod recipes;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "tune", version, about = "LoRA fine-tuning for open-weight LLMs")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a LoRA adapter from a recipe: tune run RECIPE [key.path=value ...]
    Run(run::Args),
    /// Check a recipe, its model and dataset; print the resolved recipe. Trains nothing.
    Validate {
        recipe: PathBuf,
        /// Overrides, as for `tune run`.
        overrides: Vec<String>,
    },
    /// List the built-in recipes.
    Ls,
    /// Copy a built-in recipe out: tune cp NAME DEST
    Cp { name: String, dest: PathBuf },
    /// Measure the training step: tokens/s, median step time, peak memory.
    Bench(bench::Args),
    /// Generate a completion for a prompt (the model's chat template unless --raw).
    Generate(generate::Args),
    /// Mean next-token cross-entropy of a model on a JSON-lines file of {"text": ...} records.
    Eval(eval::Args),
    /// Export a run, checkpoint or adapter: --adapter OUT (PEFT profile) and/or --merged OUT (full weights).
    Export(export::Args),
    /// Describe a model directory: family, size, dimensions, dtype, tokenizer.
    Inspect {
        /// A Hugging Face model directory.
        dir: PathBuf,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Validate { recipe, overrides } => run::validate(&recipe, &overrides),
        Command::Ls => recipes::ls(),
        Command::Cp { name, dest } => recipes::cp(&name, &dest),
        Command::Bench(args) => bench::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Export(args) => export::run(args),
        Command::Inspect { dir } => inspect::run(&dir),
    }
}

/// Loads the base model (its linear layers quantized as `quantize` says), with the adapter at
/// `adapter` (an adapter or run directory) attached.
fn load_model<B: tune::backend::Backend>(
    dir: &std::path::Path,
    adapter: Option<&std::path::Path>,
    quantize: tune::quant::Quantization,
    device: &B::Device,
) -> anyhow::Result<tune::model::CausalLm<B>> {
    use anyhow::Context;
    let opts = tune::model::LoadOptions { quantize, ..Default::default() };
    let mut model = tune::model::load_with(dir, device, &opts).with_context(|| format!("loading {}", dir.display()))?;
    if let Some(path) = adapter {
        let adapter_dir = tune::train::checkpoint::resolve_adapter_dir(path)?;
        let config = tune::peft::load_peft(&mut model, &adapter_dir, device)
            .with_context(|| format!("loading adapter {}", adapter_dir.display()))?;
        eprintln!(
            "adapter {}: {}rank {}, alpha {}, on {}",
            adapter_dir.display(),
            if config.use_dora { "DoRA, " } else { "" },
            config.rank,
            config.alpha,
            config.target_modules.join(", ")
        );
    }
    Ok(model)
}
