//! tune's cubecl configuration: where the GPU backends keep what they learn on a first start.
//!
//! A cold start on a GPU compiles every kernel and autotunes the matmuls, which took minutes on
//! CUDA. cubecl can keep both: autotune results (JSON lines) and, on CUDA, the compiled PTX. By
//! default it puts the autotune results under the `target/` of whatever Cargo project the
//! process runs in (or `~/.cache/cubecl` outside one) and keeps no PTX, so an installed `tune`
//! would re-tune in each new working directory. tune points both caches at one directory per GPU
//! model, `~/.cache/tune/cubecl/<gpu name>` (or `$TUNE_CUBECL_CACHE/<gpu name>`): cubecl's keys
//! name the runtime and device index but not the GPU model, so results tuned on one card are
//! never reused on another.
//!
//! Everything else (logging, streaming, memory) still comes from a `cubecl.toml` or
//! `burn.toml` `[cubecl]` section found from the working directory up, and from cubecl's
//! environment variables, as cubecl would read them itself.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::backend::DeviceKind;
use crate::error::{Error, Result};

/// The caches tune set up for this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuCaches {
    /// The GPU the caches belong to, as its driver names it.
    pub gpu: String,
    /// `<root>/<gpu name>`: holds `autotune/` and, on CUDA, the compiled kernels.
    pub dir: PathBuf,
}

/// Set once per process: cubecl reads its configuration once, at the first GPU use, and panics
/// on a second `set`.
static CONFIGURED: OnceLock<std::result::Result<Option<GpuCaches>, String>> = OnceLock::new();

/// The cache root: `$TUNE_CUBECL_CACHE`, else `$HOME/.cache/tune/cubecl`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TUNE_CUBECL_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache/tune/cubecl")),
        None => Err(Error::Unsupported(
            "GPU kernel caches: neither TUNE_CUBECL_CACHE nor HOME is set; set TUNE_CUBECL_CACHE to a writable directory".into(),
        )),
    }
}

/// Points cubecl's autotune and compiled-kernel caches at tune's directory for the GPU that
/// `kind` runs on, before anything on that GPU starts. Returns the caches, or `None` on the CPU
/// or where cubecl's configuration was already read in this process (a program that used a GPU
/// backend before calling this keeps cubecl's own defaults). Later calls return the first answer.
pub fn configure(kind: DeviceKind) -> Result<Option<GpuCaches>> {
    if kind == DeviceKind::Cpu {
        return Ok(None);
    }
    CONFIGURED.get_or_init(|| set_up(kind).map_err(|e| e.to_string())).clone().map_err(Error::Unsupported)
}

/// A GPU name as one directory name: letters, digits, `.`, `-` and `_`, the rest as `_`.
pub fn dir_name(gpu: &str) -> String {
    let mut out = String::new();
    for c in gpu.trim().chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let out = out.trim_matches('_').to_string();
    if out.is_empty() || out.chars().all(|c| c == '.') {
        "unnamed-gpu".into()
    } else {
        out
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn set_up(kind: DeviceKind) -> Result<Option<GpuCaches>> {
    use cubecl_runtime::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};

    if CubeClRuntimeConfig::storage().lock().is_some() {
        return Ok(None);
    }
    let gpu = gpu_name(kind)?;
    let dir = cache_root()?.join(dir_name(&gpu));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    config.autotune.cache = CacheConfig::File(dir.clone());
    config.compilation.cache = Some(CacheConfig::File(dir.clone()));
    // `set` panics if another thread read the configuration in between; the check above runs
    // before any GPU use of tune's own, so only a foreign thread could race it.
    CubeClRuntimeConfig::set(config);
    Ok(Some(GpuCaches { gpu, dir }))
}

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
fn set_up(kind: DeviceKind) -> Result<Option<GpuCaches>> {
    kind.check_available()?;
    Ok(None)
}

/// The name of the GPU the default device of `kind` opens, asked of the driver without creating
/// a cubecl client (that would read cubecl's configuration).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn gpu_name(kind: DeviceKind) -> Result<String> {
    match kind {
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => cuda_name(),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => wgpu_name(),
        other => {
            other.check_available()?;
            Err(Error::Unsupported(format!("no GPU name for device {other:?}")))
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_name() -> Result<String> {
    use cudarc::driver::result;
    // cudarc's dynamic loading panics when there is no libcuda: turn that into an error here,
    // before burn-cuda panics on it with less to say.
    let name = std::panic::catch_unwind(|| -> std::result::Result<String, String> {
        result::init().map_err(|e| format!("{e:?}"))?;
        let device = result::device::get(0).map_err(|e| format!("{e:?}"))?;
        result::device::get_name(device).map_err(|e| format!("{e:?}"))
    });
    match name {
        Ok(Ok(name)) => Ok(name),
        Ok(Err(e)) => Err(Error::Unsupported(format!("device cuda: the CUDA driver reports no usable GPU: {e}"))),
        Err(_) => Err(Error::Unsupported("device cuda: no CUDA driver (libcuda) could be loaded on this machine".into())),
    }
}

/// The adapter burn-wgpu's default device opens: the high-performance one of the platform's
/// graphics API (Vulkan, Metal or DX12), or the one `CUBECL_WGPU_DEFAULT_DEVICE` names.
#[cfg(feature = "wgpu")]
fn wgpu_name() -> Result<String> {
    use burn_wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
    let backend = AutoGraphicsApi::backend();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: backend.into(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let wanted = std::env::var("CUBECL_WGPU_DEFAULT_DEVICE").ok();
    let adapter = match wanted.as_deref().and_then(override_type) {
        Some((kind, index)) => {
            block_on(instance.enumerate_adapters(backend.into())).into_iter().filter(|a| a.get_info().device_type == kind).nth(index)
        }
        None => block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
        }))
        .ok(),
    };
    match adapter {
        Some(adapter) => Ok(adapter.get_info().name),
        None => Err(Error::Unsupported(format!(
            "device wgpu: no {backend:?} adapter found (on a machine without a GPU, Mesa's lavapipe provides one: apt-get install mesa-vulkan-drivers libvulkan1)"
        ))),
    }
}

/// `DiscreteGpu(1)`, `Cpu`, …, as cubecl-wgpu parses CUBECL_WGPU_DEFAULT_DEVICE.
#[cfg(feature = "wgpu")]
fn override_type(var: &str) -> Option<(wgpu::DeviceType, usize)> {
    if var == "Cpu" {
        return Some((wgpu::DeviceType::Cpu, 0));
    }
    let (name, rest) = var.split_once('(')?;
    let index = rest.strip_suffix(')')?.parse().ok()?;
    let kind = match name {
        "DiscreteGpu" => wgpu::DeviceType::DiscreteGpu,
        "IntegratedGpu" => wgpu::DeviceType::IntegratedGpu,
        "VirtualGpu" => wgpu::DeviceType::VirtualGpu,
        _ => return None,
    };
    Some((kind, index))
}

/// Native wgpu resolves adapter requests at once; this polls until it does.
#[cfg(feature = "wgpu")]
fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(value) = future.as_mut().poll(&mut cx) {
            return value;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_names_become_one_safe_directory_name() {
        assert_eq!(dir_name("NVIDIA H200"), "NVIDIA_H200");
        assert_eq!(dir_name("llvmpipe (LLVM 15.0.6, 256 bits)"), "llvmpipe_LLVM_15.0.6_256_bits");
        assert_eq!(dir_name("../../etc"), ".._.._etc");
        assert_eq!(dir_name(" / "), "unnamed-gpu");
        assert_eq!(dir_name(".."), "unnamed-gpu");
    }
}
