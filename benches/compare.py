#!/usr/bin/env python3
"""Side by side: the LoRA training step of transformers + PEFT and of `tune bench`, same workload.

LoRA on all seven projections, random token ids, AdamW, 2 warm-up steps then `--steps` timed
steps; tokens/s over the timed steps, median step time, peak memory (RSS on CPU, peak allocated
device memory on CUDA), the time from the start of loading to the end of the first step (kernel
compilation and autotuning included), and on a GPU the MFU. Prints a table and the ratio
tune / PyTorch.

MFU counts 4·N FLOPs a token, N the weights of the linear layers the tokens pass through (the
head included, the embedding lookup not): 2·N forward and 2·N for the input gradients, as the
frozen weights get no gradient. LoRA's own products and attention's scores are left out, so it
is a lower bound. The peak is `--peak-tflops`, or the dense bf16 rate of a known GPU.

  python3 benches/compare.py --model ~/.cache/tune/models/smollm2-135m-instruct            # W1, CPU, f32
  python3 benches/compare.py --model DIR --device cuda --dtype bf16 --seq 1024 --batch 4 --rank 16
  python3 benches/compare.py --make-random llama-1b --model /tmp/w2     # a random Llama-3.2-1B-shaped model

Needs torch, transformers and peft (never used by tune itself or its tests).
"""
import argparse, json, os, resource, statistics, subprocess, sys, time
from pathlib import Path

SHAPES = {
    # Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 kv heads, ffn 8192, vocab 128256
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                     max_position_embeddings=131072, rms_norm_eps=1e-5),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    # GPT-2 small (124M): the shape of `tune bench`'s GPT-2 row
    "gpt2-124m": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
}
TARGETS = "all-linear"  # as tune bench: every linear layer but the head


def make_random(shape, out):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type", "llama"), **spec, bos_token_id=1, eos_token_id=2)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
    print(f"wrote a random {shape} model to {out}", file=sys.stderr)


def linear_weights(model_dir):
    """N: the elements of every 2-D weight but the embedding table, plus the head's when it is
    tied to the embedding; read from the safetensors headers (no tensor is loaded)."""
    n, embed, head = 0, 0, False
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, t in header.items():
            if name == "__metadata__" or len(t["shape"]) != 2:
                continue
            size = t["shape"][0] * t["shape"][1]
            if "embed_tokens" in name or name.endswith("wte.weight"):
                embed = size
            else:
                n += size
                head |= "lm_head" in name
    return n if head else n + embed


# Dense bf16 peaks (TFLOP/s) of GPUs, by a part of the name nvidia-smi gives; the longest part
# that matches wins ("H100 PCIe" before "H100", "L40S" before "L4").
PEAKS = {"H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0, "L4": 121.0,
         "L40": 181.0, "L40S": 362.0, "RTX 4090": 165.0}


def gpu_peak(a):
    if a.peak_tflops:
        return a.peak_tflops
    if a.device != "cuda" or a.dtype != "bf16":  # the table holds bf16 peaks
        return None
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout
    hits = [k for k in PEAKS if k in name]
    return PEAKS[max(hits, key=len)] if hits else None


def torch_bench(a):
    import torch
    import peft
    from transformers import AutoModelForCausalLM
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(dev)
    cfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    for n, p in model.named_parameters():  # LoRA weights and optimizer state in f32, as tune keeps them
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(2 + a.steps):
        ids = torch.randint(0, vocab, (a.batch, a.seq), generator=gen).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            first = time.perf_counter() - start
        if step >= 2:
            times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() / 2**20) if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens_per_s": a.seq * a.batch * a.steps / sum(times), "step_s_median": statistics.median(times), "peak_mib": peak,
            "to_first_step_s": first}


def tune_bench(a):
    cmd = [a.tune, "bench", "--model", a.model, "--seq", str(a.seq), "--batch", str(a.batch), "--rank", str(a.rank),
           "--steps", str(a.steps), "--device", a.device, "--dtype", a.dtype, "--json"]
    env = dict(os.environ)
    if a.threads:
        env["RAYON_NUM_THREADS"] = str(a.threads)
    peak_dev = [0.0]
    stop = [False]
    if a.device == "cuda":  # tune has no device-memory counter yet: sample nvidia-smi meanwhile
        import threading
        def used():
            q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True).stdout
            return float(q.split()[0])
        base = used()
        def sample():
            while not stop[0]:
                peak_dev[0] = max(peak_dev[0], used() - base)
                time.sleep(0.2)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    stop[0] = True
    r = json.loads(out.strip().splitlines()[-1])
    peak = peak_dev[0] if a.device == "cuda" else r["peak_rss_mib"]
    return {"tokens_per_s": r["tokens_per_s"], "step_s_median": r["step_s_median"], "peak_mib": peak,
            "to_first_step_s": r["to_first_step_s"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path.home() / ".cache/tune/models/smollm2-135m-instruct"))
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: their defaults)")
    p.add_argument("--tune", default=os.environ.get("TUNE_BIN", "target/release/tune"))
    p.add_argument("--only", choices=["torch", "tune"])
    p.add_argument("--make-random", choices=sorted(SHAPES))
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak for MFU (default: known GPUs' dense bf16)")
    a = p.parse_args()
    if a.make_random:
        make_random(a.make_random, a.model)
        return
    rows = {}
    if a.only != "tune":
        rows["transformers+peft"] = torch_bench(a)
    if a.only != "torch":
        rows["tune"] = tune_bench(a)
    mem = "peak device MiB" if a.device == "cuda" else "peak RSS MiB"
    peak = gpu_peak(a)
    flops = 4 * linear_weights(a.model)
    for r in rows.values():
        r["mfu"] = r["tokens_per_s"] * flops / (peak * 1e12) if peak else None
    print(f"workload: {Path(a.model).name}, seq {a.seq}, batch {a.batch}, rank {a.rank}, {a.dtype}, {a.device}, {a.steps} timed steps")
    print(f"| | tokens/s | median step s | {mem} | to first step s | MFU |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['step_s_median']:.3f} | {r['peak_mib']:.0f} | {r['to_first_step_s']:.1f} | {mfu} |")
    if len(rows) == 2:
        t, p_ = rows["tune"], rows["transformers+peft"]
        print(f"tune / PyTorch: speed {t['tokens_per_s'] / p_['tokens_per_s']:.2f}x, memory {t['peak_mib'] / p_['peak_mib']:.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
