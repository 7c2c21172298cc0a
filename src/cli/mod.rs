//! The `tune` command line: one function per verb. anyhow lives here and in main.rs only.

mod eval;
mod generate;
mod inspect;

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
    /// Generate a completion for a prompt (the model's chat template unless --raw).
    Generate(generate::Args),
    /// Mean next-token cross-entropy of a model on a JSON-lines file of {"text": ...} records.
    Eval(eval::Args),
    /// Describe a model directory: family, size, dimensions, dtype, tokenizer.
    Inspect {
        /// A Hugging Face model directory.
        dir: PathBuf,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Inspect { dir } => inspect::run(&dir),
    }
}

/// `--adapter` arrives with LoRA training; until then say so instead of ignoring it.
fn refuse_adapter(adapter: &Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(dir) = adapter {
        anyhow::bail!(
            "--adapter {}: loading LoRA adapters is not supported yet in this version of tune",
            dir.display()
        );
    }
    Ok(())
}
