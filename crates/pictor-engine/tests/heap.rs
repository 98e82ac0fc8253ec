//! `heap::keep_freed_memory` and `heap::release_freed_memory` on glibc.
//!
//! Run without the test harness: the settings are process-wide and the resident-memory
//! figures must not be disturbed by other tests' threads, so this is one `main` on one
//! thread.

/// Resident set size of this process, from `/proc/self/statm`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("procfs");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm has a resident field");
    pages * 4096
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    const SIZE: usize = 256 << 20;
    let touch = || {
        let block = vec![1u8; SIZE];
        std::hint::black_box(&block);
    };
    // Default glibc: a block this large is mmapped and unmapped again on free.
    let before = resident_bytes();
    touch();
    let default_after = resident_bytes();
    assert!(
        default_after < before + SIZE / 2,
        "by default the freed block goes back: {before} → {default_after}"
    );

    pictor_engine::heap::keep_freed_memory();
    touch();
    let kept = resident_bytes();
    assert!(
        kept >= before + SIZE / 2,
        "kept: the freed pages stay resident for the next tensor: {before} → {kept}"
    );
    pictor_engine::heap::release_freed_memory();
    let released = resident_bytes();
    assert!(
        released + SIZE / 2 <= kept,
        "released: malloc_trim hands them back: {kept} → {released}"
    );
    println!("heap: default {before} → {default_after}, kept {kept}, released {released}");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {}
