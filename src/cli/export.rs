use std::path::PathBuf;

use anyhow::Context;
use tune::export::{self, OutDtype};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A run directory (its latest checkpoint), a checkpoint directory, or a PEFT adapter directory.
    src: PathBuf,
    /// Write the adapter, in the profile PEFT, vLLM, llama.cpp and Ollama all accept, to this directory.
    #[arg(long, value_name = "OUT", required_unless_present = "merged")]
    adapter: Option<PathBuf>,
    /// Write base + adapter merged as a full Hugging Face checkpoint to this directory.
    #[arg(long, value_name = "OUT")]
    merged: Option<PathBuf>,
    /// Storage dtype of the written tensors: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: OutDtype,
    /// Largest safetensors shard of a merged export (5GB, 500MB, 2GiB, ...).
    #[arg(long, default_value = "5GB", value_parser = export::parse_size)]
    max_shard_size: u64,
    /// The base model directory (default: the adapter's base_model_name_or_path, when local).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// The base_model_name_or_path to write into adapter_config.json (e.g. a hub id).
    #[arg(long, value_name = "NAME")]
    base_model: Option<String>,
    /// Replace OUT when it exists.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let resolve = |p: &PathBuf| tune::recipe::resolve(p);
    let src = export::resolve_source(&resolve(&args.src))?;
    let base = export::base_dir(args.model.as_ref().map(resolve).as_deref(), &src.adapter_dir)?;
    // Shapes catch most wrong pairings; a same-shaped model needs the recorded name.
    if let (Some(given), Ok((c, _))) = (&base, tune::peft::read_adapter_config(&src.adapter_dir)) {
        let recorded = c.base_model_name_or_path.map(PathBuf::from).filter(|p| p.is_dir());
        if let Some(recorded) = recorded.filter(|r| r.canonicalize().ok() != given.canonicalize().ok()) {
            eprintln!(
                "warning: the adapter was trained on {}, not {}; exporting against {} anyway",
                recorded.display(),
                given.display(),
                given.display()
            );
        }
    }
    let opts = export::Options { dtype: args.dtype, base, base_name: args.base_model.clone(), overwrite: args.overwrite };
    export(&src, args.adapter.map(|p| resolve(&p)).as_deref(), args.merged.map(|p| resolve(&p)).as_deref(), args.max_shard_size, &opts)
}

/// Both exports of a source, with a line each on stderr (shared with `tune run`'s output.export).
pub fn export(
    src: &export::Source,
    adapter: Option<&std::path::Path>,
    merged: Option<&std::path::Path>,
    max_shard_size: u64,
    opts: &export::Options,
) -> anyhow::Result<()> {
    let from = match src.step {
        Some(s) => format!("{} (step {s})", src.adapter_dir.display()),
        None => src.adapter_dir.display().to_string(),
    };
    if let Some(out) = adapter {
        let w = export::export_adapter(src, out, opts).with_context(|| format!("exporting the adapter of {from}"))?;
        eprintln!("adapter ({}) -> {}: {} ({})", opts.dtype.torch_name(), w.dir.display(), w.files.join(", "), size(w.bytes));
    }
    if let Some(out) = merged {
        let started = std::time::Instant::now();
        let w = export::export_merged(src, out, max_shard_size, opts).with_context(|| format!("merging {from}"))?;
        eprintln!(
            "merged ({}) -> {}: {} files, {} in {:.1} s",
            opts.dtype.torch_name(),
            w.dir.display(),
            w.files.len(),
            size(w.bytes),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1_000_000_000 => format!("{:.2} GB", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b => format!("{:.1} kB", b as f64 / 1e3),
    }
}
