//! Choosing the device and the compute dtype.

use candle_core::{DType, Device};

use crate::error::Result;

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU.
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl DeviceChoice {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        Ok(match self {
            Self::Cpu => Device::Cpu,
            Self::Cuda(ordinal) => Device::new_cuda(ordinal)?,
        })
    }
}

/// The dtype the networks compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// f32 on CPU, bf16 on GPUs (see [`DTypeChoice::resolve`]).
    #[default]
    Auto,
    /// 32-bit float.
    F32,
    /// bfloat16. On the CPU the transformer keeps its weight matrices in bf16 (half the
    /// memory of f32) and computes in f32.
    Bf16,
    /// IEEE half.
    F16,
}

impl DTypeChoice {
    /// The dtype to use on `device`.
    ///
    /// `Auto` is f32 on CPU: candle 0.11.1 has no bf16 gemm on CPU and widens both bf16
    /// operands to f32 on every matmul, which measured slower than plain f32 on this
    /// project's machines (see BENCHMARKS.md). An explicit bf16 on the CPU still computes
    /// the transformer in f32, from bf16 weights widened block by block: for when f32
    /// weights do not fit. On CUDA `Auto` is bf16, the dtype FLUX was trained and
    /// published in.
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
