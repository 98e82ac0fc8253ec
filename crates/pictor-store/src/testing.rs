//! PostgreSQL for the tests: the one `scripts/services` starts (or finds running), with a
//! fresh database per test.

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

/// A new, empty database on the test PostgreSQL server, migrated.
pub(crate) async fn fresh_postgres() -> Result<Db> {
    services(&["up", "postgres"]);
    let env = services(&["env"]);
    let url = env
        .lines()
        .find_map(|l| l.strip_prefix("export PICTOR_DATABASE_URL="))
        .expect("scripts/services env names the database")
        .to_string();
    let admin = Db::connect_only(&url).await?;
    let name = format!("pictor_test_{}", hex::encode(rand::random::<[u8; 6]>()));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin.pool)
        .await?;
    let (base, _) = url.rsplit_once('/').expect("a database URL has a path");
    Db::connect(&format!("{base}/{name}")).await
}
