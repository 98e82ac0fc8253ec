//! Image bytes in object storage: a local directory (one process) or any S3-compatible
//! store (a cluster), through `object_store`.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, ObjectStore, PutOptions, PutPayload,
    RetryConfig,
    aws::{AmazonS3, AmazonS3Builder},
    local::LocalFileSystem,
    path::Path as ObjectPath,
    prefix::PrefixStore,
    signer::Signer,
};

use crate::{Result, StoreError};

/// An S3-compatible bucket for images.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// The server, for a store other than AWS (`http://127.0.0.1:8333`); path-style
    /// requests, and plain HTTP when the endpoint says so.
    pub endpoint: Option<String>,
    /// The region (`us-east-1` when absent).
    pub region: Option<String>,
}

/// The S3 client and the key prefix its objects live under (for presigning).
struct S3 {
    client: Arc<AmazonS3>,
    prefix: String,
}

/// Where image bytes live.
#[derive(Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    s3: Option<Arc<S3>>,
}

impl Blobs {
    /// A local directory (created if needed).
    pub fn local(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| object_store::Error::Generic {
            store: "local",
            source: Box::new(e),
        })?;
        Ok(Self {
            store: Arc::new(LocalFileSystem::new_with_prefix(dir)?),
            s3: None,
        })
    }

    /// An S3-compatible bucket; credentials come from the usual AWS variables
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...). Requests give up within
    /// seconds when the store is down, so that a client gets an answer, not a hang.
    pub fn s3(options: &S3Options) -> Result<Self> {
        let rest = options
            .url
            .strip_prefix("s3://")
            .filter(|r| !r.is_empty())
            .ok_or_else(|| StoreError::StorageUrl(options.url.clone()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(options.region.as_deref().unwrap_or("us-east-1"))
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(30)),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 2,
                retry_timeout: Duration::from_secs(5),
            });
        if let Some(endpoint) = &options.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let client = Arc::new(builder.build()?);
        let prefix = prefix.trim_matches('/').to_string();
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            client.clone()
        } else {
            let inner: Arc<dyn ObjectStore> = client.clone();
            Arc::new(PrefixStore::new(inner, prefix.as_str()))
        };
        Ok(Self {
            store,
            s3: Some(Arc::new(S3 { client, prefix })),
        })
    }

    /// Stores `bytes` as `name`, with its MIME type where the store keeps one (S3 serves
    /// it back on a presigned GET).
    pub async fn put(&self, name: &str, bytes: Bytes, content_type: &str) -> Result<()> {
        let mut options = PutOptions::default();
        if self.s3.is_some() {
            options.attributes =
                Attributes::from_iter([(Attribute::ContentType, content_type.to_string())]);
        }
        self.store
            .put_opts(&ObjectPath::from(name), PutPayload::from(bytes), options)
            .await?;
        Ok(())
    }

    /// Reads `name`.
    pub async fn get(&self, name: &str) -> Result<Bytes> {
        match self.store.get(&ObjectPath::from(name)).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => {
                Err(StoreError::NotFound(name.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes `name`; a missing object is not an error.
    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.store.delete(&ObjectPath::from(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A presigned GET of `name` valid for `expires_in`, when the store is S3 (the store
    /// itself then checks the signature and the expiry); `None` for a local directory.
    pub async fn presigned_get(&self, name: &str, expires_in: Duration) -> Result<Option<String>> {
        let Some(s3) = &self.s3 else {
            return Ok(None);
        };
        let path = if s3.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", s3.prefix))
        };
        let url = s3
            .client
            .signed_url(http::Method::GET, &path, expires_in)
            .await?;
        Ok(Some(url.to_string()))
    }

    /// Whether the bytes live in S3.
    pub fn is_s3(&self) -> bool {
        self.s3.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_delete() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::local(dir.path())?;
        blobs
            .put("a.png", Bytes::from_static(b"png"), "image/png")
            .await?;
        assert_eq!(blobs.get("a.png").await?, Bytes::from_static(b"png"));
        assert_eq!(
            blobs
                .presigned_get("a.png", Duration::from_secs(60))
                .await?,
            None
        );
        blobs.delete("a.png").await?;
        assert!(matches!(
            blobs.get("a.png").await,
            Err(StoreError::NotFound(_))
        ));
        blobs.delete("a.png").await?;
        Ok(())
    }

    #[tokio::test]
    async fn s3_keeps_the_type_and_its_presigned_links_refuse_tampering_and_expiry() -> Result<()> {
        let blobs = Blobs::s3(&crate::testing::s3().await)?;
        let name = format!("{}.png", hex::encode(rand::random::<[u8; 8]>()));
        blobs
            .put(&name, Bytes::from_static(b"\x89PNG bytes"), "image/png")
            .await?;
        assert_eq!(
            blobs.get(&name).await?,
            Bytes::from_static(b"\x89PNG bytes")
        );
        let http = reqwest::Client::new();
        let url = blobs
            .presigned_get(&name, Duration::from_secs(600))
            .await?
            .expect("S3 presigns");
        let got = http.get(&url).send().await.unwrap();
        assert_eq!(got.status(), 200);
        assert_eq!(got.headers()["content-type"], "image/png");
        assert_eq!(&got.bytes().await.unwrap()[..], b"\x89PNG bytes");
        // One digit of the signature changed.
        let mut tampered = url.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == '0' { '1' } else { '0' });
        assert_eq!(http.get(&tampered).send().await.unwrap().status(), 403);
        // Expired.
        let short = blobs
            .presigned_get(&name, Duration::from_secs(1))
            .await?
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(http.get(&short).send().await.unwrap().status(), 403);
        blobs.delete(&name).await?;
        assert!(matches!(
            blobs.get(&name).await,
            Err(StoreError::NotFound(_))
        ));
        // A bucket URL of another kind is refused by name.
        assert!(matches!(
            Blobs::s3(&S3Options {
                url: "gs://x".into(),
                ..Default::default()
            }),
            Err(StoreError::StorageUrl(_))
        ));
        Ok(())
    }
}
