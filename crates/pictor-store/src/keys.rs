//! API keys and their usage.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{Db, Result, StoreError, now_unix};

/// A key as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Stable id (`key_` + hex).
    pub id: String,
    /// The name given at creation.
    pub name: String,
    /// The secret's first characters, for telling keys apart.
    pub prefix: String,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
    /// Rate limits, if any.
    pub limits: KeyLimits,
}

/// A key's rate limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Requests per minute.
    pub requests_per_minute: Option<u32>,
    /// Images per minute (a request for `n` images counts `n`).
    pub images_per_minute: Option<u32>,
}

/// A freshly created key: the only time the secret is seen.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The key's record.
    pub key: ApiKey,
    /// The secret, `sk-` + 64 hex characters (32 random bytes).
    pub secret: String,
}

/// Usage totals of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// The key.
    pub key: ApiKey,
    /// Requests served.
    pub requests: i64,
    /// Images generated.
    pub images: i64,
    /// Pixels generated.
    pub pixels: i64,
    /// Seconds of generation.
    pub seconds: f64,
}

/// An update of key `id` that touched `rows` rows: none means no such key.
fn found(rows: u64, id: &str) -> Result<()> {
    if rows == 0 {
        return Err(StoreError::NotFound(format!("no key with id {id}")));
    }
    Ok(())
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    name: String,
    prefix: String,
    created_at: i64,
    revoked_at: Option<i64>,
    requests_per_minute: Option<i64>,
    images_per_minute: Option<i64>,
}

/// The columns of a [`KeyRow`].
const KEY_COLUMNS: &str = "k.id, k.name, k.prefix, k.created_at, k.revoked_at, k.requests_per_minute, k.images_per_minute";

impl From<KeyRow> for ApiKey {
    fn from(r: KeyRow) -> Self {
        let limit = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0);
        Self {
            id: r.id,
            name: r.name,
            prefix: r.prefix,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
            limits: KeyLimits {
                requests_per_minute: limit(r.requests_per_minute),
                images_per_minute: limit(r.images_per_minute),
            },
        }
    }
}

#[derive(sqlx::FromRow)]
struct AuthRow {
    #[sqlx(flatten)]
    key: KeyRow,
    secret_hash: String,
}

#[derive(sqlx::FromRow)]
struct UsageRow {
    #[sqlx(flatten)]
    key: KeyRow,
    requests: i64,
    images: i64,
    pixels: i64,
    seconds: f64,
}

impl Db {
    /// Creates a key named `name`.
    pub async fn create_key(&self, name: &str) -> Result<NewKey> {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let secret = format!("sk-{}", hex::encode(bytes));
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        let key = ApiKey {
            id: format!("key_{}", hex::encode(id)),
            name: name.to_string(),
            prefix: secret[..10].to_string(),
            created_at: now_unix(),
            revoked_at: None,
            limits: KeyLimits::default(),
        };
        sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, secret_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(&key.prefix)
        .bind(hash(&secret))
        .bind(key.created_at)
        .execute(&self.pool)
        .await?;
        Ok(NewKey { key, secret })
    }

    /// All keys, oldest first.
    pub async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        let rows: Vec<KeyRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k ORDER BY k.created_at, k.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(ApiKey::from).collect())
    }

    /// Whether any key was ever created (the server then requires one on every request).
    pub async fn has_keys(&self) -> Result<bool> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Revokes key `id`; revoking twice is not an error.
    pub async fn revoke_key(&self, id: &str) -> Result<()> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
                .bind(now_unix())
                .bind(id)
                .execute(&self.pool)
                .await?;
        found(done.rows_affected(), id)
    }

    /// Sets key `id`'s rate limits (`None` removes one).
    pub async fn set_limits(&self, id: &str, limits: KeyLimits) -> Result<()> {
        let done = sqlx::query(
            "UPDATE api_keys SET requests_per_minute = $1, images_per_minute = $2 WHERE id = $3",
        )
        .bind(limits.requests_per_minute.map(i64::from))
        .bind(limits.images_per_minute.map(i64::from))
        .bind(id)
        .execute(&self.pool)
        .await?;
        found(done.rows_affected(), id)
    }

    /// The active key whose secret is `secret`, if any.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<ApiKey>> {
        let digest = hash(secret);
        let row: Option<AuthRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS}, k.secret_hash FROM api_keys k WHERE k.secret_hash = $1"
        ))
        .bind(&digest)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|row| {
            let same: bool = row.secret_hash.as_bytes().ct_eq(digest.as_bytes()).into();
            (same && row.key.revoked_at.is_none()).then(|| ApiKey::from(row.key))
        }))
    }

    /// Records one served request for `key_id`.
    pub async fn record_usage(
        &self,
        key_id: &str,
        images: i64,
        pixels: i64,
        seconds: f64,
    ) -> Result<()> {
        sqlx::query("INSERT INTO usage_events (key_id, at, images, pixels, seconds) VALUES ($1, $2, $3, $4, $5)")
            .bind(key_id)
            .bind(now_unix())
            .bind(images)
            .bind(pixels)
            .bind(seconds)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Usage totals per key (keys with no usage show zeros).
    pub async fn usage(&self) -> Result<Vec<Usage>> {
        let rows: Vec<UsageRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS},
                    COUNT(u.key_id) AS requests,
                    CAST(COALESCE(SUM(u.images), 0) AS BIGINT) AS images,
                    CAST(COALESCE(SUM(u.pixels), 0) AS BIGINT) AS pixels,
                    CAST(COALESCE(SUM(u.seconds), 0.0) AS DOUBLE PRECISION) AS seconds
             FROM api_keys k LEFT JOIN usage_events u ON u.key_id = k.id
             GROUP BY {KEY_COLUMNS}
             ORDER BY k.created_at, k.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Usage {
                key: r.key.into(),
                requests: r.requests,
                images: r.images,
                pixels: r.pixels,
                seconds: r.seconds,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_and_usage_on_sqlite() -> Result<()> {
        keys_authenticate_until_revoked_and_usage_adds_up(Db::connect("sqlite::memory:").await?)
            .await
    }

    #[tokio::test]
    async fn keys_and_usage_on_postgres() -> Result<()> {
        let db = crate::testing::fresh_postgres().await?;
        assert_eq!(db.backend(), crate::Backend::Postgres);
        keys_authenticate_until_revoked_and_usage_adds_up(db).await
    }

    async fn keys_authenticate_until_revoked_and_usage_adds_up(db: Db) -> Result<()> {
        assert!(!db.has_keys().await?);
        let a = db.create_key("alice").await?;
        assert!(a.secret.starts_with("sk-") && a.secret.len() == 67);
        assert!(db.has_keys().await?);
        assert_eq!(
            db.authenticate(&a.secret).await?.map(|k| k.id),
            Some(a.key.id.clone())
        );
        assert_eq!(db.authenticate("sk-nope").await?, None);
        db.record_usage(&a.key.id, 2, 2 * 64 * 64, 1.5).await?;
        db.record_usage(&a.key.id, 1, 64 * 64, 0.5).await?;
        let usage = db.usage().await?;
        assert_eq!(
            (usage[0].requests, usage[0].images, usage[0].pixels),
            (2, 3, 3 * 64 * 64)
        );
        assert!((usage[0].seconds - 2.0).abs() < 1e-9);
        let limits = KeyLimits {
            requests_per_minute: Some(30),
            images_per_minute: None,
        };
        db.set_limits(&a.key.id, limits).await?;
        let seen = db.authenticate(&a.secret).await?.expect("still active");
        assert_eq!(seen.limits, limits);
        assert_eq!(db.list_keys().await?[0].limits, limits);
        db.revoke_key(&a.key.id).await?;
        assert_eq!(db.authenticate(&a.secret).await?, None);
        assert!(db.list_keys().await?[0].revoked_at.is_some());
        assert!(matches!(
            db.revoke_key("key_missing").await,
            Err(StoreError::NotFound(_))
        ));
        Ok(())
    }
}
