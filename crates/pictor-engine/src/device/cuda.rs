//! Finding and opening a CUDA GPU. The build loads the CUDA libraries when first used
//! (`scripts/build-cuda`), so the same binary starts on a machine without a driver; this
//! module looks for the driver first and says what is missing instead of letting the
//! first CUDA call abort the process.

use candle_core::{
    Device,
    cuda_backend::cudarc::driver::{CudaContext, sys},
};

/// Where an NVIDIA driver installs its user-space library.
const DRIVER_LIBRARIES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];

/// The CUDA version this build's kernels and libraries need of the driver (13.0, as
/// `cuDriverGetVersion` spells it).
const NEEDED_DRIVER_API: i32 = 13000;

/// GPUs the driver sees, or why none can be used.
pub(super) fn count() -> Result<usize, String> {
    // SAFETY: loading the driver's library runs only its initialisers; cudarc loads the
    // same library on its first call.
    let found = DRIVER_LIBRARIES
        .iter()
        .any(|name| unsafe { libloading::Library::new(*name) }.is_ok());
    if !found {
        return Err("no NVIDIA driver found (libcuda.so.1 is not on the library path)".into());
    }
    let mut version = 0;
    // SAFETY: the driver is present (above); the call writes one int.
    let status = unsafe { sys::cuDriverGetVersion(&mut version) };
    if status != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("the NVIDIA driver did not answer ({status:?})"));
    }
    if version < NEEDED_DRIVER_API {
        return Err(format!(
            "the NVIDIA driver supports CUDA {}.{}; this build needs CUDA {}.{} (driver 580 or later)",
            version / 1000,
            version % 1000 / 10,
            NEEDED_DRIVER_API / 1000,
            NEEDED_DRIVER_API % 1000 / 10,
        ));
    }
    CudaContext::device_count()
        .map(|n| usize::try_from(n).unwrap_or(0))
        .map_err(|e| format!("the NVIDIA driver could not count its GPUs: {e}"))
}

/// Opens GPU `ordinal`, or says why it cannot.
pub(super) fn open(ordinal: usize) -> Result<Device, String> {
    let count = count().map_err(|why| format!("cannot use cuda:{ordinal}: {why}"))?;
    if ordinal >= count {
        return Err(format!(
            "cannot use cuda:{ordinal}: the NVIDIA driver sees {count} GPU(s), numbered from 0"
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| format!("opening cuda:{ordinal}: {e}"))
}

fn context(device: &Device) -> Option<std::sync::Arc<CudaContext>> {
    match device {
        Device::Cuda(d) => Some(d.cuda_stream().context().clone()),
        _ => None,
    }
}

/// The GPU's name, as the driver gives it.
pub(super) fn name(device: &Device) -> Option<String> {
    context(device)?.name().ok()
}

/// Bytes free on the GPU now.
pub(super) fn free_memory(device: &Device) -> Option<u64> {
    let (free, _total) = context(device)?.mem_get_info().ok()?;
    u64::try_from(free).ok()
}

/// Whether f32 matrix products may use TF32 tensor cores.
pub(super) fn set_tf32(on: bool) {
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(on);
}
