use std::path::PathBuf;
use std::time::Instant;

use tune::backend::Backend;
use tune::backend::DeviceKind;
use tune::data::{read_records, string_field, text_ids};
use tune::hf::Tokenizer;
use tune::model::CausalLm;
use tune::quant::Quantization;
use tune::{eval, model, with_backend};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// JSON lines (or a JSON array) of {"text": "..."} records.
    #[arg(long)]
    data: PathBuf,
    /// Truncate each record to this many tokens.
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// A LoRA adapter: a PEFT adapter directory or a run directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Store the base's decoder linear layers quantized, as model.quantize: nf4, int8 or none.
    #[arg(long, default_value = "none")]
    quantize: Quantization,
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
    /// Print one JSON line {"loss", "tokens", "perplexity"}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // The model directory first: its errors say more than a missing tokenizer would.
    tune::model::ModelConfig::from_model_dir(&args.model)?;
    let tokenizer = Tokenizer::from_model_dir(&args.model)?;
    let eos = eos_id(&args.model, &tokenizer)?;
    let records = read_records(&args.data)?;
    let mut sequences = Vec::with_capacity(records.len());
    for record in &records {
        let mut ids = text_ids(&tokenizer, string_field(&args.data, record, "text")?, eos)?;
        if let Some(max) = args.max_seq_len {
            ids.truncate(max);
        }
        sequences.push(ids);
    }
    if sequences.is_empty() {
        anyhow::bail!("{}: no records", args.data.display());
    }
    let report = with_backend!(args.device, evaluate(&args.model, args.adapter.as_deref(), args.quantize, &sequences))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("loss {:.6}  perplexity {:.4}  over {} predicted tokens", report.loss, report.perplexity, report.tokens);
    }
    Ok(())
}

fn evaluate<B: Backend>(
    device: &B::Device,
    dir: &std::path::Path,
    adapter: Option<&std::path::Path>,
    quantize: Quantization,
    sequences: &[Vec<u32>],
) -> anyhow::Result<eval::EvalReport> {
    let model: CausalLm<B> = super::load_model(dir, adapter, quantize, device)?;
    let start = Instant::now();
    let report = eval::evaluate(&model, sequences, device);
    eprintln!("evaluated {} tokens in {:.1} s", report.tokens, start.elapsed().as_secs_f64());
    Ok(report)
}

/// The EOS id appended to text records: the tokenizer's eos_token, else config.json's first.
pub fn eos_id(dir: &std::path::Path, tokenizer: &Tokenizer) -> anyhow::Result<Option<u32>> {
    if let Some(id) = tokenizer.eos_token().and_then(|t| tokenizer.token_to_id(t)) {
        return Ok(Some(id));
    }
    Ok(model::ModelConfig::from_model_dir(dir)?.eos_token_ids.first().copied())
}
