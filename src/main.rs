use clap::Parser;

mod cli;

fn main() {
    keep_freed_memory();
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A training step allocates and frees the same few hundred MB of activations every time. By
/// default glibc returns freed memory at the top of the heap to the kernel (and serves large
/// blocks from fresh mappings), so each step faults in and zeroes the same pages again: 15% of
/// the CPU time of `tune bench` went to clearing pages. Keep freed memory for reuse instead.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes allocator thresholds; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
