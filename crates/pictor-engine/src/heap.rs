//! How the process heap treats the engine's large, short-lived tensors.
//!
//! A transformer forward allocates and frees dozens of tensors of 10–300 MB each. glibc's
//! `malloc` serves anything over 32 MiB with a fresh `mmap` and unmaps it on `free`, so every
//! such tensor costs a page fault and a zeroed page per 4 KiB when it is first written: at
//! 512² on 2 threads that was about 10 % of a full-width step, and about 14 % at 1024².
//! Preloading jemalloc or mimalloc with their default settings did not lower the fault count.
//!
//! [`keep_freed_memory`] makes glibc serve every size from its heap and keep what is freed,
//! so the next block's tensors reuse pages that are already mapped. [`release_freed_memory`]
//! hands the free pages back to the system: the engine calls it after loading a part (whose
//! dtype conversions and concatenations leave scratch behind), and the server when its
//! queue is empty, so an idle server holds only the model. On other platforms and
//! allocators both do nothing.

/// Makes freed memory stay mapped for reuse: no `mmap` per large allocation, no trimming of
/// the heap's top, and one arena for all threads (so a tensor freed on the model's thread
/// is reused by the next one wherever it is allocated). Call it once at start-up, before
/// other threads allocate.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes glibc's malloc parameters; it is called before the
    // process starts its worker threads.
    unsafe {
        let ok = libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
            && libc::mallopt(libc::M_ARENA_MAX, 1) == 1;
        if !ok {
            tracing::warn!("glibc refused a malloc setting; large tensors will be mmapped");
        }
    }
}

/// Returns the heap's free pages to the system (they stay reserved, not resident).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free memory; live allocations are untouched.
    unsafe {
        libc::malloc_trim(0);
    }
}
