//! Choosing the device and the compute dtype: a GPU when the build has CUDA and the
//! machine a driver and a GPU, else the CPU, and the one description of it that receipts
//! and `/v1/models` show.

use candle_core::{DType, Device};

use crate::error::{EngineError, Result};

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
mod cuda {
    //! A build without CUDA: no GPU to find.
    use candle_core::Device;

    pub(super) fn count() -> std::result::Result<usize, String> {
        Err("this build of pictor has no CUDA support".into())
    }

    pub(super) fn open(ordinal: usize) -> std::result::Result<Device, String> {
        Err(format!(
            "cannot use cuda:{ordinal}: this build of pictor has no CUDA support (build it with scripts/build-cuda, or cargo build --features cuda)"
        ))
    }

    pub(super) fn name(_: &Device) -> Option<String> {
        None
    }

    pub(super) fn free_memory(_: &Device) -> Option<u64> {
        None
    }

    pub(super) fn set_tf32(_: bool) {}
}

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first CUDA GPU when this build has CUDA and the machine an NVIDIA driver and a
    /// GPU; otherwise the CPU, with the reason logged.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature); an error when it cannot be used.
    Cuda(usize),
}

impl DeviceChoice {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => cuda::open(ordinal).map_err(EngineError::Device),
            Self::Auto if !cfg!(feature = "cuda") => Ok(Device::Cpu),
            Self::Auto => match cuda::count() {
                Ok(0) => {
                    tracing::info!("the NVIDIA driver sees no GPU: running on the CPU");
                    Ok(Device::Cpu)
                }
                Ok(_) => cuda::open(0).or_else(|why| {
                    tracing::warn!("{why}: running on the CPU");
                    Ok(Device::Cpu)
                }),
                Err(why) => {
                    tracing::info!("{why}: running on the CPU");
                    Ok(Device::Cpu)
                }
            },
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{other}` (auto, cpu, cuda, cuda:N)")),
        }
    }
}

/// How receipts and `/v1/models` name a device: `cpu`, or `cuda:0 (NVIDIA H100 80GB HBM3)`.
pub fn describe(device: &Device) -> String {
    use candle_core::DeviceLocation;
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => match cuda::name(device) {
            Some(name) => format!("cuda:{gpu_id} ({name})"),
            None => format!("cuda:{gpu_id}"),
        },
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Chooses how f32 matrix products run on a GPU for a model computing in `dtype`: in
/// bf16 or f16 on tensor cores in TF32, whose 10-bit mantissa holds bf16 values (the
/// attention's q and k, see `flux::attention`) exactly and which accumulates in f32, so
/// the scores are those flash attention computes; in f32 in full f32, held to the CPU's
/// 1e-4. The setting is the process's (candle's): the last model loaded decides.
pub fn set_f32_products(device: &Device, dtype: DType) {
    if device.is_cuda() {
        cuda::set_tf32(dtype != DType::F32);
    }
}

/// A dtype as configuration, receipts and `/v1/models` spell it (`bf16`, `f32`).
pub(crate) fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

/// Bytes free on a GPU now (`None` on the CPU): what a model loaded onto it may take.
pub fn free_memory(device: &Device) -> Option<u64> {
    cuda::free_memory(device)
}

/// The dtype the networks compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// f32 on CPU, bf16 on GPUs (see [`DTypeChoice::resolve`]).
    #[default]
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16. On the CPU the transformer and T5 keep their weight matrices in bf16
    /// (half the memory of f32); the products run on the CPU's native bf16 dot products
    /// where it has them (AVX-512 BF16), else in f32 from weights widened block by block.
    Bf16,
    /// IEEE half.
    F16,
}

impl DTypeChoice {
    /// The dtype to use on `device`.
    ///
    /// `Auto` is f32 on CPU: the same seed then gives the same image on every CPU, within
    /// 1e-4 of diffusers' f32 numbers. An explicit bf16 halves the weights' memory and, on
    /// a CPU with native bf16 dot products, runs the transformer about twice as fast as
    /// f32 (BENCHMARKS.md), 0.2 % off f32's final latents on the test fixture. On CUDA
    /// `Auto` is bf16, the dtype FLUX was trained and published in.
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            Self::Auto if device.is_cpu() => DType::F32,
            Self::Auto => DType::BF16,
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for DTypeChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            other => Err(format!("unknown dtype `{other}` (auto, f32, bf16, f16)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_as_configuration_spells_them() {
        for (text, want) in [
            ("auto", DeviceChoice::Auto),
            ("CPU", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(want), "{text}");
        }
        for bad in ["cuda:", "cuda:-1", "tpu", "metal"] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains("auto, cpu, cuda, cuda:N"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_cpu_is_named_and_has_no_gpu_budget() {
        let cpu = DeviceChoice::Cpu.open().unwrap();
        assert_eq!(describe(&cpu), "cpu");
        assert_eq!(free_memory(&cpu), None);
        assert_eq!(dtype_name(DType::BF16), "bf16");
    }

    /// Without CUDA in the build, `auto` is the CPU and an asked-for GPU is a clear error,
    /// not a panic.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_build_without_cuda_runs_auto_on_the_cpu_and_refuses_a_gpu() {
        assert!(DeviceChoice::Auto.open().unwrap().is_cpu());
        let err = DeviceChoice::Cuda(1).open().unwrap_err().to_string();
        assert!(
            err.contains("cuda:1")
                && err.contains("no CUDA support")
                && err.contains("scripts/build-cuda"),
            "{err}"
        );
    }
}
