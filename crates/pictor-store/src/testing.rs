//! PostgreSQL and S3 for the tests (this crate's, and others' through the `testing`
//! feature): those `scripts/services` starts (or finds running), with a fresh database per
//! test.

use std::process::Command;

use crate::{Db, Result};

fn services(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/services");
    let out = Command::new(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        out.status.success(),
        "scripts/services {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn exported(env: &str, name: &str) -> Option<String> {
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("export {name}=")))
        .map(str::to_string)
}

/// The test S3 server's bucket (its credentials put in this process's environment).
pub async fn s3() -> crate::S3Options {
    services(&["up", "s3"]);
    let env = services(&["env"]);
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        let value = exported(&env, var).expect("scripts/services env names the S3 credentials");
        // Safety: every test that reads these sets the same values.
        unsafe { std::env::set_var(var, value) };
    }
    crate::S3Options {
        url: exported(&env, "PICTOR_STORAGE__URL").expect("a bucket URL"),
        endpoint: exported(&env, "PICTOR_STORAGE__ENDPOINT"),
        region: exported(&env, "PICTOR_STORAGE__REGION"),
    }
}

/// A new, empty database on the test PostgreSQL server, migrated.
pub async fn fresh_postgres() -> Result<Db> {
    Ok(fresh().await?.1)
}

/// The URL of a new database on the test PostgreSQL server, migrated.
pub async fn fresh_postgres_url() -> Result<String> {
    Ok(fresh().await?.0)
}

/// A new database on the test PostgreSQL server: its URL, and the pool that migrated it.
async fn fresh() -> Result<(String, Db)> {
    services(&["up", "postgres"]);
    let env = services(&["env"]);
    let url =
        exported(&env, "PICTOR_DATABASE_URL").expect("scripts/services env names the database");
    let admin = Db::connect_only(&url).await?;
    let name = format!("pictor_test_{}", hex::encode(rand::random::<[u8; 6]>()));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin.pool)
        .await?;
    let (base, _) = url.rsplit_once('/').expect("a database URL has a path");
    let url = format!("{base}/{name}");
    let db = Db::connect(&url).await?;
    Ok((url, db))
}
