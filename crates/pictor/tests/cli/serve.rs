//! `pictor serve` as a user starts it: refused off loopback without a key, then serving the
//! shipped model with no configuration, and a graceful exit on SIGTERM.

use std::{path::Path, process::Command};

use super::pictor;

/// Waits (up to 30 s) for a server at `url` to answer `/readyz`.
pub(crate) async fn ready(client: &reqwest::Client, url: &str) -> bool {
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{url}/readyz")).send().await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

/// Starts `cmd serve` on a free loopback port, its stderr going to `stderr`; returns the
/// process and the server's URL.
pub(crate) fn start(
    mut cmd: Command,
    stderr: std::process::Stdio,
) -> (std::process::Child, String) {
    let port = free_port();
    let child = cmd
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(stderr)
        .spawn()
        .unwrap();
    (child, format!("http://127.0.0.1:{port}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn serve_refuses_a_public_address_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = pictor()
        .env("XDG_DATA_HOME", dir.path())
        .current_dir(dir.path())
        .args(["serve", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("keys create") && stderr.contains("0.0.0.0"),
        "{stderr}"
    );
}

#[test]
fn serve_answers_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = pictor();
    cmd.env("XDG_DATA_HOME", dir.path()).current_dir(dir.path());
    let (mut child, url) = start(cmd, std::process::Stdio::piped());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answered = rt.block_on(async {
        let client = reqwest::Client::new();
        if !ready(&client, &url).await {
            return 0;
        }
        let body = serde_json::json!({"model": "gpt-image-1", "prompt": "a cat", "size": "128x128",
                                      "response_format": "b64_json"});
        let r = client
            .post(format!("{url}/v1/images/generations"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        // It draws only the size it was trained at, and says so.
        let other =
            serde_json::json!({"model": "gpt-image-1", "prompt": "a cat", "size": "256x256"});
        let r = client
            .post(format!("{url}/v1/images/generations"))
            .json(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let refused: serde_json::Value = r.json().await.unwrap();
        assert_eq!(refused["error"]["param"], "size");
        let why = refused["error"]["message"].as_str().unwrap_or_default();
        assert!(why.contains("draws only 128x128"), "{why}");
        // Each part's memory, in /v1/models and /metrics.
        let models: serde_json::Value = client
            .get(format!("{url}/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let rules = &models["data"][0]["rules"];
        assert_eq!(rules["default_size"], "128x128", "{models}");
        assert_eq!(
            (rules["min_side"].as_u64(), rules["max_side"].as_u64()),
            (Some(128), Some(128))
        );
        let parts = models["data"][0]["memory"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let names: Vec<&str> = parts.iter().filter_map(|p| p["part"].as_str()).collect();
        assert_eq!(names, ["clip", "t5", "transformer", "vae"], "{models}");
        assert!(
            parts
                .iter()
                .all(|p| p["bytes"].as_u64().unwrap_or(0) > 0 && p["resident"] == true)
        );
        // A build without CUDA runs `device = "auto"` on the CPU, and says so.
        assert_eq!(models["data"][0]["device"], "cpu f32", "{models}");
        assert!(parts.iter().all(|p| p["device"] == "cpu"), "{models}");
        // The seed's own request on a fresh install: 404, and the command that gets it.
        let seed = serde_json::json!({"model": "flux-1-schnell", "prompt": "A white siamese cat"});
        let r = client
            .post(format!("{url}/v1/images/generations"))
            .json(&seed)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
        let missing: serde_json::Value = r.json().await.unwrap();
        let why = missing["error"]["message"].as_str().unwrap_or_default();
        assert!(
            why.contains("pictor models pull flux-1-schnell") && why.contains("pictor-tiny"),
            "{why}"
        );
        let metrics = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("pictor_model_memory_bytes{"), "{metrics}");
        assert!(
            metrics.contains("pictor_process_resident_bytes"),
            "{metrics}"
        );
        status
    });
    assert_eq!(
        answered, 200,
        "the shipped model answers with no config and no key on loopback"
    );
    // SIGTERM: graceful shutdown, exit status 0.
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    // The data directory (hashed keys, usage, images, the signing key) is the user's alone.
    use std::os::unix::fs::PermissionsExt;
    let data = dir.path().join("pictor");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        let want = if entry.file_type().unwrap().is_dir() {
            0o700
        } else {
            0o600
        };
        assert_eq!(mode(&entry.path()), want, "{}", entry.path().display());
    }
    assert_eq!(mode(&data.join("pictor.db")), 0o600);
}
