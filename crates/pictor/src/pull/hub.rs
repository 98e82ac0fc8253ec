//! The Hugging Face Hub side of `pictor models pull`: list a repository's files with their
//! sizes and hashes, download the chosen ones into the standard cache with `hf-hub`
//! (resuming partial files), and check each against what the Hub says it is.
//!
//! `hf-hub` 0.5 does the HTTP, the cache layout and resuming; it neither skips files that
//! are already there, nor checks sizes or hashes, nor reads `HF_TOKEN`: those are here.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use hf_hub::{
    Cache, Repo, RepoType,
    api::{
        Progress,
        sync::{Api, ApiBuilder, ApiError},
    },
};
use serde::Deserialize;
use sha2::Digest;

/// The Hub's answer to `GET /api/models/{repo}/revision/{rev}?blobs=true`, as far as used.
#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// One file of a repository at a commit, with what it must hash to.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    pub name: String,
    pub size: u64,
    /// SHA-256 of the content (large files, kept in Git LFS).
    pub sha256: Option<String>,
    /// Git's blob SHA-1 (`blob <len>\0<content>`) for small files kept in git itself.
    pub git_sha1: Option<String>,
}

/// A repository pinned to the commit its revision pointed at when listed.
#[derive(Debug)]
pub struct Listing {
    pub repo: String,
    pub revision: String,
    pub commit: String,
    pub files: Vec<RemoteFile>,
}

/// Where a pull talks to and writes: the endpoint, token and cache folder.
pub struct Hub {
    api: Api,
    cache: PathBuf,
    endpoint: String,
    token: bool,
}

impl Hub {
    /// The Hub at `HF_ENDPOINT` (default huggingface.co), with `HF_TOKEN` or the token file
    /// that `hf auth login` writes, downloading into `cache`.
    pub fn from_env(cache: &Path) -> anyhow::Result<Self> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim()
            .trim_end_matches('/')
            .to_string();
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .map(|t| t.trim().to_string())
            .or_else(|| Cache::from_env().token());
        let has_token = token.is_some();
        let api = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
            .with_endpoint(endpoint.clone())
            .with_token(token)
            .with_progress(false)
            .with_retries(4)
            .with_user_agent("pictor", env!("CARGO_PKG_VERSION"))
            .build()
            .context("setting up the Hugging Face Hub client")?;
        Ok(Self {
            api,
            cache: cache.to_path_buf(),
            endpoint,
            token: has_token,
        })
    }

    /// The files of `repo` at `revision`, with sizes and hashes, and the commit.
    pub fn list(&self, repo: &str, revision: &str) -> anyhow::Result<Listing> {
        let api_repo = self.api.repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            revision.to_string(),
        ));
        let answer = api_repo.info_request().query("blobs", "true").call();
        let info: RepoInfo = match answer {
            Ok(mut response) => response
                .body_mut()
                .read_json()
                .with_context(|| format!("reading the Hub's file list of {repo}"))?,
            Err(err) => return Err(self.explain(repo, revision, None, &err)),
        };
        let files = info
            .siblings
            .into_iter()
            .map(|s| RemoteFile {
                size: s.lfs.as_ref().map(|l| l.size).or(s.size).unwrap_or(0),
                sha256: s.lfs.map(|l| l.sha256.to_ascii_lowercase()),
                git_sha1: s.blob_id.map(|b| b.to_ascii_lowercase()),
                name: s.rfilename,
            })
            .collect();
        Ok(Listing {
            repo: repo.to_string(),
            revision: revision.to_string(),
            commit: info.sha,
            files,
        })
    }

    /// Whether a copy of `file` of the right size is already in the snapshot.
    pub fn is_cached(&self, listing: &Listing, file: &RemoteFile) -> bool {
        let path = self.snapshot(listing).join(&file.name);
        fs::metadata(path).is_ok_and(|meta| meta.len() == file.size)
    }

    /// The snapshot folder of the listed commit.
    pub fn snapshot(&self, listing: &Listing) -> PathBuf {
        self.cache_repo(listing, &listing.commit)
            .pointer_path(&listing.commit)
    }

    fn cache_repo(&self, listing: &Listing, revision: &str) -> hf_hub::CacheRepo {
        Cache::new(self.cache.clone()).repo(Repo::with_revision(
            listing.repo.clone(),
            RepoType::Model,
            revision.to_string(),
        ))
    }

    /// Downloads `file` into the cache (resuming a partial download), then checks it; a
    /// file that does not check out is deleted and fetched once more before giving up.
    pub fn download(
        &self,
        listing: &Listing,
        file: &RemoteFile,
        progress: impl Progress + Clone,
    ) -> anyhow::Result<PathBuf> {
        let mut last = None;
        for _ in 0..2 {
            self.drop_overlong_part(listing, file);
            let api_repo = self.api.repo(Repo::with_revision(
                listing.repo.clone(),
                RepoType::Model,
                listing.commit.clone(),
            ));
            let path = api_repo
                .download_with_progress(&file.name, progress.clone())
                .map_err(|err| self.explain_api(&listing.repo, &listing.revision, file, err))?;
            match check(&path, file) {
                Ok(()) => {
                    // hf-hub records the commit under its own (pinned) name; the revision
                    // asked for points at it too, so `owner/name` finds this snapshot.
                    self.cache_repo(listing, &listing.revision)
                        .create_ref(&listing.commit)
                        .context("writing the cache's ref")?;
                    return Ok(path);
                }
                Err(why) => {
                    tracing::warn!(file = %file.name, %why, "download did not check out; fetching it again");
                    remove_with_blob(&path);
                    last = Some(why);
                }
            }
        }
        let why = last.unwrap_or_default();
        bail!(
            "{}: {why}; the bad copy was deleted. The connection or a mirror corrupted it: run the pull again",
            file.name
        )
    }

    /// A partial file as long as the whole (or longer) cannot be resumed: hf-hub would ask
    /// for bytes past the end. It is started over.
    fn drop_overlong_part(&self, listing: &Listing, file: &RemoteFile) {
        let Some(etag) = file.sha256.as_ref().or(file.git_sha1.as_ref()) else {
            return;
        };
        let blob = self.cache_repo(listing, &listing.commit).blob_path(etag);
        let part = blob.with_extension("part");
        if fs::metadata(&part).is_ok_and(|m| m.len() >= file.size) {
            let _ = fs::remove_file(&part);
        }
    }

    fn explain_api(
        &self,
        repo: &str,
        revision: &str,
        file: &RemoteFile,
        err: ApiError,
    ) -> anyhow::Error {
        match err {
            ApiError::RequestError(e) => self.explain(repo, revision, Some(&file.name), &e),
            ApiError::TooManyRetries(inner) => match *inner {
                ApiError::RequestError(e) => self.explain(repo, revision, Some(&file.name), &e),
                other => anyhow::anyhow!("{}: download failed after retries: {other}", file.name),
            },
            other => anyhow::anyhow!("{}: download failed: {other}", file.name),
        }
    }

    /// A clear message for an HTTP failure, by status.
    fn explain(
        &self,
        repo: &str,
        revision: &str,
        file: Option<&str>,
        err: &ureq::Error,
    ) -> anyhow::Error {
        let page = format!("{}/{repo}", self.endpoint);
        let what = match file {
            Some(f) => format!("{repo}: {f}"),
            None => repo.to_string(),
        };
        match err {
            ureq::Error::StatusCode(401) if !self.token => anyhow::anyhow!(
                "{what}: the Hub asks for a token (401): this repository is gated or private. \
                 Accept its licence at {page} while logged in, create a read token at \
                 https://huggingface.co/settings/tokens and set HF_TOKEN=hf_... (or run `hf auth login`)"
            ),
            ureq::Error::StatusCode(401 | 403) => anyhow::anyhow!(
                "{what}: the Hub refused the token ({err}). Accept the repository's licence at \
                 {page} with the account the token belongs to, and check the token can read it"
            ),
            ureq::Error::StatusCode(404) => anyhow::anyhow!(
                "{what}: not found on {} (404): check the repository id, the revision `{revision}` \
                 and the file name",
                self.endpoint
            ),
            other => anyhow::anyhow!("{what}: {other} (from {})", self.endpoint),
        }
    }
}

/// Checks a downloaded file against the listing: its size, then its SHA-256 (large files)
/// or git blob SHA-1 (small ones).
fn check(path: &Path, file: &RemoteFile) -> Result<(), String> {
    let len = fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len != file.size {
        return Err(format!("{len} bytes where the Hub lists {}", file.size));
    }
    if let Some(want) = &file.sha256 {
        let got = digest::<sha2::Sha256>(path, None).map_err(|e| e.to_string())?;
        if &got != want {
            return Err(format!("SHA-256 {got} where the Hub lists {want}"));
        }
    } else if let Some(want) = &file.git_sha1 {
        let header = format!("blob {len}\0");
        let got = digest::<sha1::Sha1>(path, Some(header.as_bytes())).map_err(|e| e.to_string())?;
        if &got != want {
            return Err(format!("git SHA-1 {got} where the Hub lists {want}"));
        }
    }
    Ok(())
}

/// The hex digest of `prefix` followed by the file's bytes.
fn digest<D: Digest>(path: &Path, prefix: Option<&[u8]>) -> std::io::Result<String> {
    let mut hasher = D::new();
    if let Some(p) = prefix {
        hasher.update(p);
    }
    let mut file = fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Removes a snapshot entry and the blob it links to.
fn remove_with_blob(pointer: &Path) {
    if let Ok(target) = fs::canonicalize(pointer) {
        let _ = fs::remove_file(target);
    }
    let _ = fs::remove_file(pointer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_files_check_by_git_blob_hash_and_large_by_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"hello\n").unwrap();
        // `git hash-object` of "hello\n", and `sha256sum`.
        let small = RemoteFile {
            name: "f".into(),
            size: 6,
            sha256: None,
            git_sha1: Some("ce013625030ba8dba906f756967f9e9ca394464a".into()),
        };
        assert_eq!(check(&path, &small), Ok(()));
        let large = RemoteFile {
            sha256: Some("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03".into()),
            git_sha1: None,
            ..small.clone()
        };
        assert_eq!(check(&path, &large), Ok(()));
        fs::write(&path, b"hellO\n").unwrap();
        assert!(check(&path, &small).unwrap_err().contains("git SHA-1"));
        assert!(check(&path, &large).unwrap_err().contains("SHA-256"));
        fs::write(&path, b"hello").unwrap();
        assert!(check(&path, &large).unwrap_err().contains("5 bytes"));
    }
}
