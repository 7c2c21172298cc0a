//! Which burn backend runs where. Everything in tune is generic over `B: Backend` (burn's, plus
//! tune's fused ops); this module picks the concrete types and dispatches a generic function on
//! the device the user asked for.

pub mod cubecl_config;

use crate::error::{Error, Result};

/// A burn backend with tune's fused operations ([`crate::ops`]): what the model is generic over.
pub trait Backend: crate::ops::FusedOps {}
impl<B: crate::ops::FusedOps> Backend for B {}

/// The CPU backend. burn-flex (gemm-based, SIMD) is the default; build with
/// `--features ndarray-cpu` to use burn-ndarray instead.
#[cfg(not(feature = "ndarray-cpu"))]
pub type Cpu = burn::backend::Flex;
#[cfg(feature = "ndarray-cpu")]
pub type Cpu = burn::backend::NdArray;

#[cfg(feature = "cuda")]
/// CUDA GPUs: burn-cuda's CubeBackend, without fusion (Cargo.toml says why).
pub type Cuda = burn_cuda::Cuda;

/// Vulkan, Metal or DX12 through wgpu (burn-wgpu's CubeBackend, without fusion), f32 only:
/// WGSL has no bf16.
#[cfg(feature = "wgpu")]
pub type Wgpu = burn_wgpu::Wgpu;

/// `cpu`, `cuda` or `wgpu`, as written in recipes and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
    Wgpu,
}

impl std::str::FromStr for DeviceKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda),
            "wgpu" => Ok(DeviceKind::Wgpu),
            other => Err(Error::Unsupported(format!("device `{other}`: expected cpu, cuda or wgpu"))),
        }
    }
}

impl DeviceKind {
    /// Refuses a GPU device in a build without its feature.
    pub fn check_available(self) -> Result<()> {
        let (name, built) = match self {
            DeviceKind::Cpu => return Ok(()),
            DeviceKind::Cuda => ("cuda", cfg!(feature = "cuda")),
            DeviceKind::Wgpu => ("wgpu", cfg!(feature = "wgpu")),
        };
        if !built {
            return Err(Error::Unsupported(format!(
                "device {name}: this tune was built without {name} support; rebuild with `cargo build --release --features {name}`"
            )));
        }
        Ok(())
    }
}

/// Calls `$f::<Backend>(device, args...)` for the chosen device kind; on a GPU, after pointing
/// cubecl's caches at tune's ([`cubecl_config`]).
#[macro_export]
macro_rules! with_backend {
    // First: a `@gpu` call must not reach the public rule, whose `$kind:expr` cannot parse `@`.
    (@gpu $kind:expr, $backend:ty, $f:ident ( $($arg:expr),* )) => {
        match $crate::backend::cubecl_config::configure($kind) {
            Err(e) => Err(e.into()),
            Ok(_) => {
                let device = Default::default();
                $f::<$backend>(&device, $($arg),*)
            }
        }
    };
    ($kind:expr, $f:ident ( $($arg:expr),* $(,)? )) => {{
        match $kind {
            $crate::backend::DeviceKind::Cpu => {
                let device = Default::default();
                $f::<$crate::backend::Cpu>(&device, $($arg),*)
            }
            #[cfg(feature = "cuda")]
            $crate::backend::DeviceKind::Cuda => $crate::with_backend!(@gpu $kind, $crate::backend::Cuda, $f($($arg),*)),
            #[cfg(feature = "wgpu")]
            $crate::backend::DeviceKind::Wgpu => $crate::with_backend!(@gpu $kind, $crate::backend::Wgpu, $f($($arg),*)),
            #[allow(unreachable_patterns)]
            kind => Err(kind.check_available().expect_err("a device without its feature").into()),
        }
    }};
}

/// Device `index` of `B`'s default kind: the index-th GPU on CUDA; on the CPU, the CPU (it has
/// only one).
pub fn device_at<B: burn::tensor::backend::Backend>(index: usize) -> B::Device {
    use burn::tensor::backend::{Device, DeviceId};
    let kind = B::Device::default().to_id().type_id;
    B::Device::from_id(DeviceId::new(kind, index as u16))
}
