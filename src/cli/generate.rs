use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tune::backend::Backend;
use tune::backend::DeviceKind;
use tune::generate::{generate, Sampling};
use tune::hf::{GenerationConfig, Message, Tokenizer};
use tune::model::{CausalLm, ModelConfig};
use tune::with_backend;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// The prompt: one user message in the chat template, or the raw text with --raw.
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Feed the prompt as it is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A LoRA adapter: a PEFT adapter directory or a run directory. Its chat_template.jinja,
    /// when it has one, is used instead of the model's chat template.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Store the base's decoder linear layers quantized, as model.quantize: nf4, int8 or none.
    #[arg(long, default_value = "none")]
    quantize: tune::quant::Quantization,
    /// cpu, cuda or wgpu (a GPU needs a build with its feature).
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // The model directory first: its errors say more than a missing tokenizer would.
    tune::model::ModelConfig::from_model_dir(&args.model)?;
    let mut tokenizer = Tokenizer::from_model_dir(&args.model)?;
    // An adapter's own chat template (the one it was trained with) wins over the model's.
    if let (Some(adapter), false) = (&args.adapter, args.raw) {
        if let Some(path) = tokenizer.use_adapter_chat_template(&tune::train::checkpoint::resolve_adapter_dir(adapter)?)? {
            eprintln!("chat template: {}", path.display());
        }
    }
    let prompt_ids = if args.raw {
        tokenizer.encode(&args.prompt, true)?
    } else {
        let template = tokenizer.chat_template().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the model has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja){}; use --raw to feed the prompt as plain text",
                args.model.display(),
                if args.adapter.is_some() { ", nor has the adapter (chat_template.jinja)" } else { "" }
            )
        })?;
        let text = template.render(&[Message::new("user", args.prompt.clone())], true)?;
        // The template already holds any special tokens, as with apply_chat_template.
        tokenizer.encode(&text, false)?
    };
    let stop = stop_ids(&args.model)?;
    with_backend!(args.device, run_on(&args, &tokenizer, &prompt_ids, &stop))
}

fn run_on<B: Backend>(device: &B::Device, args: &Args, tokenizer: &Tokenizer, prompt_ids: &[u32], stop: &[u32]) -> anyhow::Result<()> {
    let start = Instant::now();
    let model: CausalLm<B> = super::load_model(&args.model, args.adapter.as_deref(), args.quantize, device)?;
    eprintln!("loaded {} in {:.2} s", args.model.display(), start.elapsed().as_secs_f64());
    let sampling = Sampling { temperature: args.temperature, top_p: args.top_p, seed: args.seed };
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut stream = tokenizer.decode_stream(true);
    let mut count = 0usize;
    let mut first_token = None;
    let mut failure: Option<anyhow::Error> = None;
    generate(&model, prompt_ids, args.max_new_tokens, sampling, stop, device, |id| {
        first_token.get_or_insert_with(|| start.elapsed());
        count += 1;
        if stop.contains(&id) || failure.is_some() {
            return;
        }
        // Print text as soon as it is complete (a character may span several tokens).
        let printed = stream.step(id).map_err(anyhow::Error::from).and_then(|text| match text {
            Some(t) => out.write_all(t.as_bytes()).and_then(|_| out.flush()).map_err(Into::into),
            None => Ok(()),
        });
        if let Err(e) = printed {
            failure = Some(e);
        }
    });
    writeln!(out)?;
    if let Some(e) = failure {
        return Err(e);
    }
    let total = start.elapsed().as_secs_f64();
    let prefill = first_token.map_or(0.0, |d| d.as_secs_f64());
    let n = count;
    eprintln!(
        "{} prompt tokens in {:.2} s, {} new tokens in {:.2} s ({:.1} tokens/s)",
        prompt_ids.len(),
        prefill,
        n,
        total,
        if total > prefill { (n.saturating_sub(1)) as f64 / (total - prefill) } else { 0.0 }
    );
    Ok(())
}

/// Generation stops at generation_config.json's eos ids, else config.json's.
fn stop_ids(dir: &Path) -> anyhow::Result<Vec<u32>> {
    if let Some(ids) = GenerationConfig::from_model_dir(dir)?.and_then(|g| g.eos_token_id) {
        return Ok(ids.to_vec());
    }
    Ok(ModelConfig::from_model_dir(dir)?.eos_token_ids)
}
