//! A loopback stand-in for the Hugging Face Hub's file API, as `hf-hub` and
//! `huggingface_hub` use it: the repository listing with sizes and hashes
//! (`/api/models/{repo}/revision/{rev}?blobs=true`) and ranged file downloads
//! (`/{repo}/resolve/{rev}/{file}`, 206 with `X-Repo-Commit`, `ETag`, `Content-Range`).
//! It can require a token, drop a connection mid-file once, or serve a corrupted file.

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Body,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use sha2::Digest;

pub const TOKEN: &str = "hf_good_token";

#[derive(Default, Clone)]
pub struct Repo {
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
    /// Files need `Authorization: Bearer TOKEN` (401 without one, 403 with another).
    pub gated: bool,
    /// Served with one byte changed, every time.
    pub corrupt: HashSet<String>,
    /// The first full download of these stops half way through.
    pub drop_once: HashSet<String>,
    /// Sizes the listing claims instead of the files' own.
    pub listed_size: BTreeMap<String, u64>,
}

impl Repo {
    /// Every file under `dir`, by its path relative to `dir`.
    pub fn from_dir(dir: &Path, commit: &str) -> Self {
        let mut files = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path
                        .strip_prefix(dir)
                        .unwrap()
                        .to_string_lossy()
                        .to_string();
                    files.insert(rel, std::fs::read(&path).unwrap());
                }
            }
        }
        Self {
            commit: commit.into(),
            files,
            ..Self::default()
        }
    }
}

#[derive(Default)]
struct Hub {
    repos: BTreeMap<String, Repo>,
    /// `file range` of every resolve request, in order.
    log: Mutex<Vec<String>>,
    dropped: Mutex<HashSet<String>>,
}

/// A running fake Hub: its URL and what it was asked.
pub struct Running {
    pub url: String,
    hub: Arc<Hub>,
    _rt: tokio::runtime::Runtime,
}

impl Running {
    /// The resolve requests so far, as `repo file range`.
    pub fn log(&self) -> Vec<String> {
        self.hub.log.lock().unwrap().clone()
    }
}

pub fn start(repos: BTreeMap<String, Repo>) -> Running {
    let hub = Arc::new(Hub {
        repos,
        ..Hub::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/api/models/{owner}/{name}/revision/{rev}", get(info))
        .route("/{owner}/{name}/resolve/{rev}/{*file}", get(resolve))
        .with_state(hub.clone());
    rt.spawn(async move { axum::serve(listener, app).await });
    Running { url, hub, _rt: rt }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn git_sha1(bytes: &[u8]) -> String {
    use sha1::Digest as _;
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex::encode(h.finalize())
}

/// Weight files are kept in LFS (hash SHA-256), the rest in git (blob SHA-1), as on the Hub.
fn is_lfs(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".gguf") || name.ends_with(".model")
}

async fn info(
    State(hub): State<Arc<Hub>>,
    UrlPath((owner, name, _rev)): UrlPath<(String, String, String)>,
) -> Response {
    let Some(repo) = hub.repos.get(&format!("{owner}/{name}")) else {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    };
    let siblings: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|(f, bytes)| {
            let size = repo
                .listed_size
                .get(f)
                .copied()
                .unwrap_or(bytes.len() as u64);
            let mut s =
                serde_json::json!({"rfilename": f, "size": size, "blobId": git_sha1(bytes)});
            if is_lfs(f) {
                s["lfs"] =
                    serde_json::json!({"sha256": sha256(bytes), "size": size, "pointerSize": 134});
            }
            s
        })
        .collect();
    axum::Json(serde_json::json!({"id": format!("{owner}/{name}"), "sha": repo.commit, "siblings": siblings}))
        .into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    UrlPath((owner, name, _rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let id = format!("{owner}/{name}");
    let Some(repo) = hub.repos.get(&id) else {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    };
    if repo.gated {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match auth {
            None => {
                return (
                    StatusCode::UNAUTHORIZED,
                    [("x-error-code", "GatedRepo")],
                    "gated",
                )
                    .into_response();
            }
            Some(a) if a != format!("Bearer {TOKEN}") => {
                return (StatusCode::FORBIDDEN, "no access").into_response();
            }
            Some(_) => {}
        }
    }
    let Some(bytes) = repo.files.get(&file) else {
        return (
            StatusCode::NOT_FOUND,
            [("x-error-code", "EntryNotFound")],
            "no such file",
        )
            .into_response();
    };
    let mut body = bytes.clone();
    if repo.corrupt.contains(&file) {
        let mid = body.len() / 2;
        body[mid] ^= 0x55;
    }
    let size = body.len();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    hub.log.lock().unwrap().push(format!("{id} {file} {range}"));
    let (start, end) = match range.strip_prefix("bytes=").and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b
                .parse()
                .map(|b: usize| b.min(size - 1))
                .unwrap_or(size - 1);
            (a, b)
        }
        None => (0, size - 1),
    };
    if start >= size {
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    }
    let etag = if is_lfs(&file) {
        sha256(bytes)
    } else {
        git_sha1(bytes)
    };
    let slice = body[start..=end].to_vec();
    let whole_from_start = start == 0 && end == size - 1 && size > 1;
    let drop_now = whole_from_start
        && repo.drop_once.contains(&file)
        && hub.dropped.lock().unwrap().insert(format!("{id}/{file}"));
    let builder = Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header("x-repo-commit", &repo.commit)
        .header(header::ETAG, format!("\"{etag}\""))
        .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"))
        .header(header::CONTENT_LENGTH, slice.len());
    let body = if drop_now {
        // Half the file, then the connection breaks.
        let half = slice[..slice.len() / 2].to_vec();
        let chunks = futures_util::stream::unfold(Some(half), |half| async move {
            match half {
                Some(h) => Some((Ok(h), None)),
                None => {
                    // Let the first half reach the client before the break.
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    Some((Err(std::io::Error::other("connection dropped")), None))
                }
            }
        });
        Body::from_stream(futures_util::StreamExt::take(chunks, 2))
    } else {
        Body::from(slice)
    };
    builder.body(body).unwrap()
}
