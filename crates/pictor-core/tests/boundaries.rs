//! The house's seams, checked over the dependency graph as Cargo resolves it (normal and
//! build dependencies, at every depth; tests' own dev-dependencies do not count): the
//! crates that only need the seam never compile the engine or candle, and the engine
//! never compiles HTTP or the stores.

use std::{path::Path, process::Command};

/// Every package `package` depends on, one `name version` per line.
fn dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["tree", "--locked", "--offline", "-p", package])
        .args(["-e", "normal,build", "--prefix", "none", "--format", "{p}"])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end_matches(" (*)").to_string())
        .collect()
}

fn has(deps: &[String], name: &str) -> bool {
    deps.iter()
        .any(|d| d.split_whitespace().next() == Some(name))
}

const NUMERIC: &[&str] = &[
    "pictor-engine",
    "candle-core",
    "candle-nn",
    "candle-transformers",
    "gemm",
    "safetensors",
    "tokenizers",
];
const HTTP_AND_STORES: &[&str] = &[
    "pictor-api",
    "axum",
    "hyper",
    "pictor-store",
    "sqlx",
    "object_store",
];

/// None of `packages` depends on any of `banned`, at any depth.
fn forbid(packages: &[&str], banned: &[&str]) {
    for package in packages {
        let deps = dependencies(package);
        for name in banned {
            assert!(!has(&deps, name), "{package} depends on {name}");
        }
    }
}

#[test]
fn only_the_engine_and_the_binary_compile_candle() {
    forbid(
        &[
            "pictor-core",
            "pictor-image",
            "pictor-sched",
            "pictor-api",
            "pictor-store",
        ],
        NUMERIC,
    );
    // The check can see what it forbids: the engine and the binary do compile candle.
    for package in ["pictor-engine", "pictor"] {
        assert!(has(&dependencies(package), "candle-core"), "{package}");
    }
}

#[test]
fn the_engine_and_the_seam_know_no_http_and_no_store() {
    forbid(
        &[
            "pictor-engine",
            "pictor-core",
            "pictor-image",
            "pictor-sched",
        ],
        HTTP_AND_STORES,
    );
    assert!(has(&dependencies("pictor-api"), "axum"));
}

#[test]
fn the_seam_depends_on_serde_and_thiserror_only() {
    // Those two and what they are built from.
    const ALLOWED: &[&str] = &[
        "pictor-core",
        "serde",
        "serde_core",
        "serde_derive",
        "thiserror",
        "thiserror-impl",
        "proc-macro2",
        "quote",
        "syn",
        "unicode-ident",
    ];
    for dep in dependencies("pictor-core") {
        let name = dep.split_whitespace().next().unwrap_or_default();
        assert!(ALLOWED.contains(&name), "pictor-core depends on {dep}");
    }
}
