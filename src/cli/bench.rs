use std::path::PathBuf;

use tune::backend::DeviceKind;
use tune::bench::{self, BenchConfig};
use tune::recipe::BaseDtype;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face model directory (default: SmolLM2-135M-Instruct from scripts/fetch-smollm2.sh).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Timed steps, after 2 warm-up steps.
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// cpu, cuda or wgpu (a GPU needs a build with its feature).
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
    /// Storage dtype of the frozen base: f32 or bf16 (default: bf16 on cuda, f32 on cpu and wgpu,
    /// as in recipes).
    #[arg(long, value_parser = ["f32", "bf16"])]
    dtype: Option<String>,
    /// Store the decoder linear layers quantized, as model.quantize: nf4, int8 or none.
    #[arg(long, default_value = "none")]
    quantize: tune::quant::Quantization,
    /// Recompute each layer in the backward pass (train.activation_checkpointing).
    #[arg(long)]
    activation_checkpointing: bool,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = args.model.clone().unwrap_or_else(|| {
        let home = std::env::var("HOME").unwrap_or_default();
        let models = std::env::var("TUNE_MODELS").unwrap_or_else(|_| format!("{home}/.cache/tune/models"));
        PathBuf::from(models).join("smollm2-135m-instruct")
    });
    let dtype = match args.dtype.as_deref() {
        Some("bf16") => BaseDtype::Bf16,
        Some(_) => BaseDtype::F32,
        None => BaseDtype::for_device(args.device),
    };
    dtype.check_device(args.device)?;
    let dtype = dtype.float_dtype();
    let config = BenchConfig {
        seq: args.seq,
        batch: args.batch,
        rank: args.rank,
        steps: args.steps,
        warmup: 2,
        dtype,
        quantize: args.quantize,
        activation_checkpointing: args.activation_checkpointing,
    };
    let report = tune::with_backend!(args.device, bench_on(&model, &config))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("| model | backend | dtype | quantize | seq | batch | rank | checkpointing | tokens/s | median step s | peak RSS MiB |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.3} | {:.0} |",
            model.file_name().unwrap_or_default().to_string_lossy(),
            report.backend,
            report.dtype,
            report.quantize,
            report.seq,
            report.batch,
            report.rank,
            if report.activation_checkpointing { "on" } else { "off" },
            report.tokens_per_s,
            report.step_s_median,
            report.peak_rss_mib
        );
    }
    Ok(())
}

fn bench_on<B: tune::backend::Backend>(
    device: &B::Device,
    model: &std::path::Path,
    config: &BenchConfig,
) -> tune::Result<bench::BenchReport> {
    bench::run::<B>(device, model, config)
}
