//! Data parallel on the CPU (`train.devices`): replicas that each take a slice of every
//! micro-batch's rows train as one device running the whole batch does, dropout and gradient
//! accumulation included, and a data-parallel run resumes bit for bit. Over several nodes
//! (`train.nodes`, processes on loopback here) the nodes train as one node with all their
//! devices, bit for bit, and resume so too.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::*;
use tune::train::metrics::{self, StepMetrics};

/// The tiny run (LoRA on every projection, dropout 0.1, 2 micro-batches per step) with
/// `overrides`, in its own directory: its per-step metrics and its adapter.
fn run(tag: &str, overrides: &[&str]) -> (Vec<StepMetrics>, HashMap<String, RefTensor>, PathBuf) {
    let dir = std::env::temp_dir().join(format!("tune-parallel-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = format!("output.dir={}", dir.display());
    let mut args = vec!["run", "tests/fixtures/tiny-run/recipe.yaml", out.as_str()];
    args.extend_from_slice(overrides);
    let (code, err) = tune(&args);
    assert_eq!(code, 0, "{tag}: {err}");
    let m = metrics::read(&dir.join("metrics.jsonl")).unwrap();
    let adapter = read_reference(&dir.join("adapter/adapter_model.safetensors"));
    (m, adapter, dir)
}

/// Per-step losses and gradient norms within 1e-5 (relative) of one device's, and the same
/// adapter to float rounding: replicas summing their rows' gradients add the same terms in
/// another order. Splitting the rows wrongly (a replica on the whole batch, masks drawn for the
/// wrong rows, the loss scaled per replica) moves these by far more.
fn same_training(
    what: &str,
    got: &(Vec<StepMetrics>, HashMap<String, RefTensor>, PathBuf),
    want: &(Vec<StepMetrics>, HashMap<String, RefTensor>, PathBuf),
) {
    assert_eq!(got.0.len(), want.0.len(), "{what}: steps");
    for (g, w) in got.0.iter().zip(&want.0) {
        eprintln!("{what} step {}: loss {:.8} vs {:.8}, grad norm {:.8} vs {:.8}", g.step, g.loss, w.loss, g.grad_norm, w.grad_norm);
        assert!(
            (g.loss - w.loss).abs() as f64 <= 1e-5 * w.loss as f64,
            "{what} step {}: loss {} vs one device's {}",
            g.step,
            g.loss,
            w.loss
        );
        assert!(
            (g.grad_norm - w.grad_norm).abs() <= 1e-5 * w.grad_norm,
            "{what} step {}: grad norm {} vs {}",
            g.step,
            g.grad_norm,
            w.grad_norm
        );
        assert_eq!(g.tokens, w.tokens, "{what} step {}: tokens", g.step);
    }
    assert!(want.0.last().unwrap().loss < want.0[0].loss, "{what}: the run learns");
    assert_eq!(got.1.len(), want.1.len());
    let mut worst = 0f64;
    for (name, t) in &want.1 {
        let (diff, _) = max_abs_diff(&got.1[name].f32s(), &t.f32s());
        worst = worst.max(diff);
    }
    // AdamW's step is about lr (1e-2) whatever a gradient's size: rounding can turn an element
    // whose gradient is near zero; a tenth of a step bounds that, as in tests/wgpu.rs.
    eprintln!("{what}: adapters differ by at most {worst:.2e}");
    assert!(worst <= 1e-3, "{what}: adapters differ by {worst:e}");
    let _ = std::fs::remove_dir_all(&got.2);
}

#[test]
fn two_replicas_train_as_one_device() {
    let one = run("one", &[]);
    let two = run("two", &["train.devices=2"]);
    same_training("2 replicas", &two, &one);
    let _ = std::fs::remove_dir_all(&one.2);
}

/// Three replicas (where the order of a plain all-reduce sum would matter) with packed rows.
#[test]
fn three_replicas_with_packed_rows_train_as_one_device() {
    let batch = ["train.batch_size=3", "dataset.packed=true", "dataset.max_seq_len=48"];
    let one = run("packed-one", &batch);
    let three = run("packed-three", &[&batch[..], &["train.devices=3"]].concat());
    same_training("3 replicas, packed", &three, &one);
    let _ = std::fs::remove_dir_all(&one.2);
}

/// Three replicas, resumed from the step-3 checkpoint: steps 4 to 6 and the adapter are those
/// of the uninterrupted run, bit for bit.
#[test]
fn three_replicas_resume_bit_for_bit() {
    let args = ["train.batch_size=3", "train.devices=3", "output.save_every=3", "output.keep_last=3"];
    let (first, _, dir) = run("resume", &args);
    let adapter = std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    let out = format!("output.dir={}", dir.display());
    let checkpoint = dir.join("checkpoints/step_000003");
    let resume = [&["run", "tests/fixtures/tiny-run/recipe.yaml", out.as_str()][..], &args, &["--resume", s(&checkpoint)]].concat();
    let (code, err) = tune(&resume);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resuming from") && err.contains("(step 3 of 6)"), "{err}");
    let resumed = metrics::read(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(resumed.len(), 6);
    for (a, b) in first.iter().zip(&resumed).skip(3) {
        assert_eq!((a.loss.to_bits(), a.grad_norm.to_bits()), (b.loss.to_bits(), b.grad_norm.to_bits()), "step {}", a.step);
    }
    assert!(std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap() == adapter, "the resumed run's adapter differs");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A batch the replicas cannot share evenly is refused before anything runs, naming the key.
#[test]
fn uneven_split_is_refused() {
    let dir = std::env::temp_dir().join(format!("tune-parallel-uneven-{}", std::process::id()));
    let out = format!("output.dir={}", dir.display());
    let (code, err) = tune(&["run", "tests/fixtures/tiny-run/recipe.yaml", &out, "train.devices=3"]);
    assert_ne!(code, 0);
    assert!(err.contains("train.devices") && err.contains("train.batch_size 2"), "{err}");
    assert!(!dir.exists(), "nothing is written for a refused recipe");
}

/// A free port on loopback, for node 0 to listen on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `tune run` of the tiny run as node `rank` of `count` meeting on loopback at `port`, into `dir`.
fn node_args(count: u32, rank: usize, port: u16, dir: &std::path::Path) -> Vec<String> {
    vec![
        "run".into(),
        "tests/fixtures/tiny-run/recipe.yaml".into(),
        format!("output.dir={}", dir.display()),
        format!("train.nodes.count={count}"),
        format!("train.nodes.rank={rank}"),
        format!("train.nodes.address=127.0.0.1:{port}"),
        // A node that cannot meet the others fails the test in a minute, not ten.
        "train.nodes.join_timeout_s=60".into(),
    ]
}

/// Runs `count` nodes of the tiny run at once on loopback, each a `tune run` process with
/// `overrides` and its rank; returns each node's metrics and run directory.
fn run_nodes(tag: &str, count: u32, overrides: &[&str], extra: &[&str]) -> Vec<(Vec<StepMetrics>, PathBuf)> {
    let port = free_port();
    let nodes: Vec<_> = (0..count)
        .map(|rank| {
            let dir = std::env::temp_dir().join(format!("tune-nodes-{tag}-{rank}-{}", std::process::id()));
            let mut args = node_args(count, rank as usize, port, &dir);
            args.extend(overrides.iter().map(|o| o.to_string()));
            args.extend(extra.iter().map(|o| o.replace("{dir}", &dir.display().to_string())));
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let (code, err) = tune(&args);
                assert_eq!(code, 0, "node {rank}: {err}");
                (metrics::read(&dir.join("metrics.jsonl")).unwrap(), dir)
            })
        })
        .collect();
    nodes.into_iter().map(|t| t.join().unwrap()).collect()
}

fn same_bits(what: &str, got: &[StepMetrics], want: &[StepMetrics]) {
    assert_eq!(got.len(), want.len(), "{what}: steps");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(
            (g.loss.to_bits(), g.grad_norm.to_bits(), g.tokens),
            (w.loss.to_bits(), w.grad_norm.to_bits(), w.tokens),
            "{what} step {}: loss {} vs {}, grad norm {} vs {}",
            g.step,
            g.loss,
            w.loss,
            g.grad_norm,
            w.grad_norm
        );
    }
}

fn adapter_bytes(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap()
}

/// Two nodes of one device each, and two nodes of two devices each, train exactly as one node
/// with two (four) devices: the same losses, gradient norms and adapter bytes on every node.
/// A node taking the wrong rows, a sum in another order or one node's gradients alone would
/// change them.
#[test]
fn nodes_on_loopback_train_as_one_node_with_all_their_devices() {
    for (tag, count, overrides, devices) in
        [("2x1", 2u32, vec![], "train.devices=2"), ("2x2", 2, vec!["train.devices=2", "train.batch_size=4"], "train.devices=4")]
    {
        let one = run(
            &format!("nodes-ref-{tag}"),
            &[&overrides.iter().filter(|o| o.starts_with("train.batch")).copied().collect::<Vec<_>>()[..], &[devices]].concat(),
        );
        let nodes = run_nodes(tag, count, &overrides, &[]);
        for (rank, (m, dir)) in nodes.iter().enumerate() {
            same_bits(&format!("{tag} node {rank}"), m, &one.0);
            assert!(adapter_bytes(dir) == adapter_bytes(&one.2), "{tag} node {rank}: the adapter differs from one node's");
            std::fs::remove_dir_all(dir).unwrap();
        }
        assert!(one.0.last().unwrap().loss < one.0[0].loss, "the run learns");
        std::fs::remove_dir_all(&one.2).unwrap();
    }
}

/// Two nodes resumed from their step-3 checkpoints repeat steps 4 to 6 and the adapter of the
/// uninterrupted run bit for bit; a node resuming from another step than node 0 is refused.
#[test]
fn nodes_resume_bit_for_bit() {
    let args = ["output.save_every=3", "output.keep_last=3"];
    let first = run_nodes("resume", 2, &args, &[]);
    let adapters: Vec<Vec<u8>> = first.iter().map(|(_, d)| adapter_bytes(d)).collect();
    // Each node resumes its own run directory (the same path the first runs used).
    let resumed = run_nodes("resume", 2, &args, &["--resume", "{dir}/checkpoints/step_000003"]);
    for (rank, ((a, _), (b, dir))) in first.iter().zip(&resumed).enumerate() {
        same_bits(&format!("resumed node {rank}"), &b[3..], &a[3..]);
        assert!(adapter_bytes(dir) == adapters[rank], "node {rank}: the resumed adapter differs");
    }
    // Node 1 from step 3, node 0 from the final checkpoint (step 6): refused.
    let port = free_port();
    let node = |rank: usize, step: &str| {
        let dir = &resumed[rank].1;
        let mut all = node_args(2, rank, port, dir);
        all.extend(args.iter().map(|a| a.to_string()));
        all.extend(["--resume".to_string(), dir.join(format!("checkpoints/{step}")).display().to_string()]);
        std::thread::spawn(move || tune(&all.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    let zero = node(0, "step_000006");
    let (code, err) = node(1, "step_000003").join().unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("node 0 refused") && err.contains("starts at step 3 and node 0 at step 6"), "{err}");
    // Node 0 still waits for a node 1; the right one lets it finish.
    let (code, err) = node(1, "step_000006").join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(zero.join().unwrap().0, 0);
    for (_, dir) in &resumed {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Ctrl-C on one node stops every node after the same step, each with a checkpoint of it (and no
/// other: `output.save_every` is 0), and the nodes resumed from there finish exactly as one node
/// with both devices does uninterrupted.
#[test]
fn ctrl_c_on_one_node_stops_every_node_after_the_same_step() {
    let steps = ["train.max_steps=300", "output.save_every=0"];
    let want = run("interrupt-ref", &[&steps[..], &["train.devices=2"]].concat());
    let port = free_port();
    let dirs: Vec<PathBuf> =
        (0..2).map(|rank| std::env::temp_dir().join(format!("tune-nodes-interrupt-{rank}-{}", std::process::id()))).collect();
    let node = |rank: usize, extra: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tune"));
        c.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(node_args(2, rank, port, &dirs[rank]))
            .args(steps)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    let (zero, one) = (node(0, &[]), node(1, &[]));
    let metrics_of = |rank: usize| dirs[rank].join("metrics.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(metrics_of(1)).map(|t| t.lines().count()).unwrap_or(0) < 20 {
        assert!(start.elapsed() < std::time::Duration::from_secs(120), "node 1 never reached step 20");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let status = std::process::Command::new("kill").args(["-INT", &one.id().to_string()]).status().unwrap();
    assert!(status.success());
    let (zero, one) = (zero.wait_with_output().unwrap(), one.wait_with_output().unwrap());
    for (rank, out) in [&zero, &one].into_iter().enumerate() {
        assert_eq!(out.status.code(), Some(130), "node {rank}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stopped: Vec<usize> = (0..2).map(|rank| metrics::read(&metrics_of(rank)).unwrap().len()).collect();
    assert_eq!(stopped[0], stopped[1], "the nodes stopped after different steps");
    assert!(stopped[0] < 300, "the interrupt came too late to test anything");
    for dir in &dirs {
        let checkpoints = tune::train::checkpoint::list(dir);
        assert_eq!(checkpoints.iter().map(|c| c.state.step).collect::<Vec<_>>(), vec![stopped[0]]);
    }
    let resumed = [node(0, &["--resume"]), node(1, &["--resume"])].map(|c| c.wait_with_output().unwrap());
    for (rank, out) in resumed.iter().enumerate() {
        assert!(out.status.success(), "node {rank}: {}", String::from_utf8_lossy(&out.stderr));
        same_bits(&format!("interrupted node {rank}"), &metrics::read(&metrics_of(rank)).unwrap(), &want.0);
        assert!(adapter_bytes(&dirs[rank]) == adapter_bytes(&want.2), "node {rank}: the adapter differs");
    }
    for dir in dirs.iter().chain([&want.2]) {
        std::fs::remove_dir_all(dir).unwrap();
    }
}
