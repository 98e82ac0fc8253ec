//! Image bytes in object storage.

use std::{path::Path, sync::Arc};

use bytes::Bytes;
use object_store::{ObjectStore, PutPayload, local::LocalFileSystem, path::Path as ObjectPath};

use crate::{Result, StoreError};

/// Where image bytes live.
#[derive(Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
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
        })
    }

    /// Stores `bytes` as `name`.
    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<()> {
        self.store
            .put(&ObjectPath::from(name), PutPayload::from(bytes))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_delete() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::local(dir.path())?;
        blobs.put("a.png", Bytes::from_static(b"png")).await?;
        assert_eq!(blobs.get("a.png").await?, Bytes::from_static(b"png"));
        blobs.delete("a.png").await?;
        assert!(matches!(
            blobs.get("a.png").await,
            Err(StoreError::NotFound(_))
        ));
        blobs.delete("a.png").await?;
        Ok(())
    }
}
