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
    /// On a GPU: run the bench twice, in two processes sharing a fresh kernel cache, and report
    /// the time to the first step of a cold start (kernels compiled and autotuned) and of a warm
    /// one (both found in the cache).
    #[arg(long, conflicts_with = "json")]
    cold_and_warm: bool,
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
    if args.cold_and_warm {
        return cold_and_warm(&args, &model);
    }
    let report = tune::with_backend!(args.device, bench_on(&model, &config))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("| model | backend | dtype | quantize | seq | batch | rank | checkpointing | tokens/s | median step s | peak RSS MiB | to first step s |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.3} | {:.0} | {:.2} |",
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
            report.peak_rss_mib,
            report.to_first_step_s
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

/// Two child processes of this same command line, with `--json` and a fresh
/// `TUNE_CUBECL_CACHE`: the first starts cold, the second finds the first's kernels.
fn cold_and_warm(args: &Args, model: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    if args.device == DeviceKind::Cpu {
        anyhow::bail!("--cold-and-warm: only a GPU device (--device cuda or wgpu) compiles and autotunes kernels at start-up");
    }
    args.device.check_available()?;
    let root = tune::backend::cubecl_config::cache_root()?.join(format!("bench-cold-{}", std::process::id()));
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("removing the old bench cache {}", root.display()))?;
    }
    let exe = std::env::current_exe().context("finding the tune executable")?;
    let child_args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--cold-and-warm").chain(["--json".to_string()]).collect();
    let mut rows = Vec::new();
    for start in ["cold", "warm"] {
        let out = std::process::Command::new(&exe)
            .args(&child_args)
            .env("TUNE_CUBECL_CACHE", &root)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&root);
            anyhow::bail!("the {start} bench run failed ({})", out.status);
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value =
            serde_json::from_str(line.trim()).with_context(|| format!("the {start} bench run printed {line:?}, not one JSON line"))?;
        rows.push((start, report));
    }
    std::fs::remove_dir_all(&root).with_context(|| format!("removing the bench cache {}", root.display()))?;
    println!("| model | backend | start | to first step s | load s | tokens/s | median step s | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|");
    for (start, r) in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {start} | {:.2} | {:.2} | {:.1} | {:.3} | {:.0} |",
            model.file_name().unwrap_or_default().to_string_lossy(),
            r["backend"].as_str().unwrap_or(""),
            f("to_first_step_s"),
            f("load_s"),
            f("tokens_per_s"),
            f("step_s_median"),
            f("peak_rss_mib"),
        );
    }
    Ok(())
}
