use std::path::PathBuf;
use std::time::Instant;

use tune::backend::Backend;
use tune::backend::DeviceKind;
use tune::data::examples::{build_example, Example, ExampleOptions};
use tune::data::read_records;
use tune::hf::Tokenizer;
use tune::model::CausalLm;
use tune::quant::Quantization;
use tune::recipe::DataFormat;
use tune::{eval, model, with_backend};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// JSON lines (or a JSON array) of records: {"text": "..."} (every token scored), or with
    /// --format alpaca / chat the records a recipe trains on (the responses scored).
    #[arg(long)]
    data: PathBuf,
    /// The records' format: text, alpaca, chat, sharegpt or prompt_completion (the chat
    /// template of --adapter if it has one, else the model's).
    #[arg(long, default_value = "text", value_parser = parse_format)]
    format: DataFormat,
    /// alpaca/chat: also score the prompt / user turns, as dataset.train_on_input.
    #[arg(long)]
    train_on_input: bool,
    /// Window length: records longer than this (or than the model's max_position_embeddings,
    /// whichever is smaller) are scored in overlapping windows.
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Tokens between the starts of consecutive windows; each window after the first scores its
    /// last `stride` tokens, the rest is context. Default: half the window.
    #[arg(long)]
    stride: Option<usize>,
    /// A LoRA adapter: a PEFT adapter directory or a run directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Store the base's decoder linear layers quantized, as model.quantize: nf4, int8 or none.
    #[arg(long, default_value = "none")]
    quantize: Quantization,
    /// cpu, cuda or wgpu (a GPU needs a build with its feature).
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
    /// Print one JSON line {"loss", "tokens", "perplexity", "records", "windowed_records", "windows", ...}.
    #[arg(long)]
    json: bool,
}

fn parse_format(s: &str) -> Result<DataFormat, String> {
    match s {
        "text" => Ok(DataFormat::Text),
        "alpaca" => Ok(DataFormat::Alpaca),
        "chat" => Ok(DataFormat::Chat),
        "sharegpt" => Ok(DataFormat::Sharegpt),
        "prompt_completion" => Ok(DataFormat::PromptCompletion),
        _ => Err(format!("`{s}`: expected text, alpaca, chat, sharegpt or prompt_completion")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // The model directory first: its errors say more than a missing tokenizer would.
    let config = tune::model::ModelConfig::from_model_dir(&args.model)?;
    let mut tokenizer = Tokenizer::from_model_dir(&args.model)?;
    if matches!(args.format, DataFormat::Chat | DataFormat::Sharegpt | DataFormat::PromptCompletion) {
        if let Some(adapter) = &args.adapter {
            let dir = tune::train::checkpoint::resolve_adapter_dir(adapter)?;
            if let Some((source, path)) = tune::hf::adapter_template::read(&dir)? {
                tokenizer.set_chat_template(&source, &path.display().to_string())?;
            }
        }
    }
    let eos = eos_id(&args.model, &tokenizer)?;
    let records = read_records(&args.data)?;
    // Records are never truncated: what does not fit one window is scored in several.
    let opts = ExampleOptions { max_seq_len: usize::MAX, train_on_input: args.train_on_input, add_eos: true, eos };
    let examples =
        records.iter().map(|r| build_example(&args.data, r, args.format, &tokenizer, opts)).collect::<tune::error::Result<Vec<_>>>()?;
    if examples.is_empty() {
        anyhow::bail!("{}: no records", args.data.display());
    }
    let len = args.max_seq_len.unwrap_or(usize::MAX).min(config.max_position_embeddings);
    let window = eval::Window::new(len, args.stride)?;
    let report = with_backend!(args.device, evaluate(&args.model, args.adapter.as_deref(), args.quantize, &examples, window))?;
    if report.windowed_records > 0 {
        eprintln!(
            "{} of {} records are longer than the window of {} tokens: scored in {} windows (stride {})",
            report.windowed_records, report.records, window.len, report.windows, window.stride
        );
    }
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
    examples: &[Example],
    window: eval::Window,
) -> anyhow::Result<eval::EvalReport> {
    let model: CausalLm<B> = super::load_model(dir, adapter, quantize, device)?;
    let start = Instant::now();
    let report = eval::evaluate_examples(&model, examples, Some(window), device);
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
