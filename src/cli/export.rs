use std::path::PathBuf;

use anyhow::Context;
use tune::export::{self, OutDtype};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A run directory (its latest checkpoint), a checkpoint directory, or a PEFT adapter directory.
    src: PathBuf,
    /// Write the adapter, in the profile PEFT, vLLM, llama.cpp and Ollama all accept, to this directory.
    #[arg(long, value_name = "OUT", required_unless_present_any = ["merged", "gguf", "gguf_adapter", "ollama"])]
    adapter: Option<PathBuf>,
    /// Write base + adapter merged as a full Hugging Face checkpoint to this directory.
    #[arg(long, value_name = "OUT")]
    merged: Option<PathBuf>,
    /// Write base + adapter merged as one GGUF file (llama.cpp, Ollama) to this file.
    #[arg(long, value_name = "FILE")]
    gguf: Option<PathBuf>,
    /// Tensor type of the GGUF files: f32, f16, bf16, q8_0 or q4_k_m (norms and biases stay f32);
    /// default q8_0 for --gguf / --ollama, f32 for --gguf-adapter.
    #[arg(long, value_name = "TYPE")]
    gguf_type: Option<export::GgufType>,
    /// llama.cpp's pre-tokenizer (tokenizer.ggml.pre) for a tokenizer tune does not recognise.
    #[arg(long, value_name = "NAME")]
    gguf_pre: Option<String>,
    /// Write the adapter as a llama.cpp GGUF LoRA (llama-cli --lora, Ollama's ADAPTER) to this file.
    #[arg(long, value_name = "FILE")]
    gguf_adapter: Option<PathBuf>,
    /// Write an Ollama model directory (Modelfile + model.gguf) to DIR: `ollama create NAME -f DIR/Modelfile`.
    #[arg(long, value_name = "DIR")]
    ollama: Option<PathBuf>,
    /// With --ollama: the base model as model.gguf and the adapter as adapter.gguf (ADAPTER), not merged.
    #[arg(long, requires = "ollama")]
    ollama_adapter: bool,
    /// With --ollama: the Go template for TEMPLATE, for chat formats tune does not translate.
    #[arg(long, value_name = "FILE", requires = "ollama")]
    ollama_template: Option<PathBuf>,
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
    // A run directory exports its latest complete checkpoint; say which newer ones were passed over.
    for why in tune::train::checkpoint::damaged(&resolve(&args.src)) {
        eprintln!("warning: skipping {why}");
    }
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
    export(&src, args.adapter.map(|p| resolve(&p)).as_deref(), args.merged.map(|p| resolve(&p)).as_deref(), args.max_shard_size, &opts)?;
    let g = export::GgufOptions { ty: args.gguf_type.unwrap_or_default(), pre: args.gguf_pre.clone() };
    let from = src.adapter_dir.display().to_string();
    if let Some(out) = args.gguf.map(|p| resolve(&p)) {
        let started = std::time::Instant::now();
        let w = export::export_gguf(&src, &out, &opts, &g).with_context(|| format!("writing {from} as GGUF"))?;
        eprintln!(
            "gguf ({}, {}) -> {}: {} tensors, {} in {:.1} s",
            w.arch,
            g.ty.name(),
            w.path.display(),
            w.tensors,
            size(w.bytes),
            started.elapsed().as_secs_f64()
        );
    }
    if let Some(out) = args.gguf_adapter.map(|p| resolve(&p)) {
        let ty = args.gguf_type.unwrap_or(export::GgufType::F32);
        let w = export::export_gguf_adapter(&src, &out, &opts, ty).with_context(|| format!("writing the adapter {from} as GGUF"))?;
        eprintln!("gguf adapter ({}, {}) -> {}: {} tensors, {}", w.arch, ty.name(), w.path.display(), w.tensors, size(w.bytes));
    }
    if let Some(dir) = args.ollama.map(|p| resolve(&p)) {
        let o = export::ollama::OllamaOptions { template: args.ollama_template.clone(), with_adapter: args.ollama_adapter };
        let written = export::export_ollama(&src, &dir, &opts, &g, &o).with_context(|| format!("writing an Ollama model of {from}"))?;
        let files: Vec<String> = written.iter().map(|w| format!("{} ({})", w.path.display(), size(w.bytes))).collect();
        eprintln!("ollama -> {}/Modelfile, {}; then: ollama create NAME -f {}/Modelfile", dir.display(), files.join(", "), dir.display());
    }
    Ok(())
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
