//! What the shipped model's images mean: `pictor serve` with no configuration serves
//! `pictor-tiny`, and the pictures it returns over the HTTP API have the background colour,
//! shape colour and position their prompts ask for, measured by pixel statistics as
//! `tools/eval_tiny.py` does.

use std::{process::Command, time::Duration};

use base64::Engine as _;

/// The training palette (`tools/scenes.py`).
const PALETTE: [(&str, [f32; 3]); 12] = [
    ("red", [220.0, 30.0, 30.0]),
    ("green", [30.0, 165.0, 60.0]),
    ("blue", [35.0, 75.0, 225.0]),
    ("yellow", [245.0, 215.0, 35.0]),
    ("orange", [245.0, 135.0, 20.0]),
    ("purple", [125.0, 45.0, 175.0]),
    ("pink", [245.0, 140.0, 195.0]),
    ("white", [245.0, 245.0, 245.0]),
    ("black", [20.0, 20.0, 20.0]),
    ("gray", [128.0, 128.0, 128.0]),
    ("brown", [115.0, 70.0, 30.0]),
    ("cyan", [40.0, 200.0, 215.0]),
];

fn nearest(rgb: [f32; 3]) -> &'static str {
    let d = |c: &[f32; 3]| (0..3).map(|i| (c[i] - rgb[i]).powi(2)).sum::<f32>();
    PALETTE
        .iter()
        .min_by(|a, b| d(&a.1).total_cmp(&d(&b.1)))
        .map(|(name, _)| *name)
        .unwrap_or("none")
}

fn median(mut values: Vec<[f32; 3]>) -> [f32; 3] {
    let mut out = [0.0; 3];
    for (c, slot) in out.iter_mut().enumerate() {
        values.sort_by(|a, b| a[c].total_cmp(&b[c]));
        *slot = values[values.len() / 2][c];
    }
    out
}

/// What an image shows: (background colour, shape colour, 3×3 cell of the shape).
fn read(img: &image::RgbImage) -> (&'static str, &'static str, (u32, u32)) {
    let (w, h) = img.dimensions();
    let px = |x: u32, y: u32| img.get_pixel(x, y).0.map(f32::from);
    let f = (h as f32 * 0.1).round() as u32;
    let frame: Vec<[f32; 3]> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| x < f || y < f || x >= w - f || y >= h - f)
        .map(|(x, y)| px(x, y))
        .collect();
    let bg = median(frame);
    let dist = |p: [f32; 3]| (0..3).map(|i| (p[i] - bg[i]).powi(2)).sum::<f32>().sqrt();
    let shape: Vec<(u32, u32, f32)> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| (x, y, dist(px(x, y))))
        .filter(|&(_, _, d)| d > 80.0)
        .collect();
    if shape.len() < 8 {
        return (nearest(bg), "none", (9, 9));
    }
    let n = shape.len() as f32;
    let cy = shape.iter().map(|s| s.1 as f32).sum::<f32>() / n;
    let cx = shape.iter().map(|s| s.0 as f32).sum::<f32>() / n;
    let cell = |v: f32, side: u32| ((v / (side as f32 / 3.0)) as u32).min(2);
    // The shape's colour: the median of its 30 % most distinct pixels (edges blend).
    let mut ds: Vec<f32> = shape.iter().map(|s| s.2).collect();
    ds.sort_by(f32::total_cmp);
    let cut = ds[(ds.len() as f32 * 0.7) as usize];
    let core: Vec<[f32; 3]> = shape
        .iter()
        .filter(|s| s.2 >= cut)
        .map(|s| px(s.0, s.1))
        .collect();
    (
        nearest(bg),
        nearest(median(core)),
        (cell(cy, h), cell(cx, w)),
    )
}

#[test]
fn the_shipped_model_draws_what_the_prompt_says() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pictor"))
        .env("XDG_DATA_HOME", dir.path())
        .env_remove("PICTOR_CONFIG")
        .current_dir(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    // (prompt, background, shape colour, (row, column)); chosen before looking at outputs.
    let cases = [
        (
            "a large red circle on a blue background in the top left",
            "blue",
            "red",
            (0, 0),
        ),
        (
            "a large yellow square on a purple background in the bottom right",
            "purple",
            "yellow",
            (2, 2),
        ),
        (
            "a large white triangle on a black background on the left",
            "black",
            "white",
            (1, 0),
        ),
        (
            "a large green star on a pink background at the top",
            "pink",
            "green",
            (0, 1),
        ),
        (
            "a large orange ring on a cyan background in the centre",
            "cyan",
            "orange",
            (1, 1),
        ),
        (
            "a large blue cross on a yellow background at the bottom",
            "yellow",
            "blue",
            (2, 1),
        ),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = rt.block_on(async {
        let client = reqwest::Client::new();
        let mut ready = false;
        for _ in 0..300 {
            if let Ok(r) = client.get(format!("{url}/readyz")).send().await
                && r.status() == 200
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "pictor serve did not become ready");
        let mut seen = Vec::new();
        for (i, (prompt, ..)) in cases.iter().enumerate() {
            let body = serde_json::json!({"model": "pictor-tiny", "prompt": prompt,
                "response_format": "b64_json", "seed": 1000 + i});
            let r = client
                .post(format!("{url}/v1/images/generations"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let reply: serde_json::Value = r.json().await.unwrap();
            let png = base64::engine::general_purpose::STANDARD
                .decode(reply["data"][0]["b64_json"].as_str().unwrap())
                .unwrap();
            let img = image::load_from_memory(&png).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (128, 128), "the native size by default");
            seen.push(read(&img));
        }
        seen
    });
    let _ = child.kill();
    let _ = child.wait();
    let mut wrong = Vec::new();
    for ((prompt, bg, fg, cell), got) in cases.iter().zip(&seen) {
        if (*bg, *fg, *cell) != *got {
            wrong.push(format!("{prompt}: want {bg}/{fg}/{cell:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
