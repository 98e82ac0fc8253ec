//! Edits through the `Pipeline` seam on the shipped model (`models/pictor-tiny`): a red
//! circle on white, its left half masked and repainted as "a blue circle", changes there
//! and stays itself elsewhere.

use std::{path::Path, sync::Arc};

use pictor_engine::{
    Control, EditInput, GenerationRequest, ModelFiles, Pipeline, RgbImage,
    flux::{FluxOptions, FluxPipeline},
};

fn shipped() -> FluxPipeline {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/pictor-tiny");
    FluxPipeline::load(&ModelFiles::from_dir(&dir).unwrap(), FluxOptions::default()).unwrap()
}

fn draw(p: &mut FluxPipeline, prompt: &str, edit: Option<EditInput>) -> RgbImage {
    let req = GenerationRequest {
        loras: Vec::new(),
        prompt: prompt.into(),
        width: 128,
        height: 128,
        steps: 4,
        guidance: None,
        seed: 3,
        n: 1,
        previews: 0,
        edit: edit.map(Arc::new),
    };
    let mut out = p
        .generate_batch(&[req], &mut |_| Control::Continue)
        .expect("draws");
    out.remove(0).images.remove(0)
}

/// Mean of channel `c` over the pixels of columns `cols` and rows `rows`.
fn mean(
    img: &RgbImage,
    cols: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    c: usize,
) -> f64 {
    let mut sum = 0.0;
    let mut n = 0.0;
    for y in rows {
        for x in cols.clone() {
            sum += f64::from(img.pixels[(y * img.width + x) * 3 + c]);
            n += 1.0;
        }
    }
    sum / n
}

/// Mean absolute difference of two images over columns `cols` and rows `rows`.
fn diff(
    a: &RgbImage,
    b: &RgbImage,
    cols: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
) -> f64 {
    let mut sum = 0.0;
    let mut n = 0.0;
    for y in rows {
        for x in cols.clone() {
            for c in 0..3 {
                let i = (y * a.width + x) * 3 + c;
                sum += f64::from(a.pixels[i].abs_diff(b.pixels[i]));
                n += 1.0;
            }
        }
    }
    sum / n
}

#[test]
fn a_masked_half_is_repainted_and_the_rest_kept() {
    let mut p = shipped();
    let red = draw(
        &mut p,
        "a large red circle on a white background in the centre",
        None,
    );
    let (r, b) = (mean(&red, 40..64, 40..88, 0), mean(&red, 40..64, 40..88, 2));
    assert!(
        r > b + 60.0,
        "the source has a red circle: red {r:.0}, blue {b:.0}"
    );
    // Repaint the left half (columns 0..64); keep the right.
    let mask = (0..128 * 128)
        .map(|i| if i % 128 < 64 { 255 } else { 0 })
        .collect();
    let edited = draw(
        &mut p,
        "a large blue circle on a white background in the centre",
        Some(EditInput {
            image: red.clone(),
            mask: Some(mask),
            strength: 1.0,
            image_sha256: String::new(),
        }),
    );
    let (r, b) = (
        mean(&edited, 40..64, 40..88, 0),
        mean(&edited, 40..64, 40..88, 2),
    );
    assert!(
        b > r + 40.0,
        "the masked half of the circle turned blue: red {r:.0}, blue {b:.0}"
    );
    // Away from the seam, the kept half is the source through one more trip through the
    // autoencoder.
    let kept = diff(&red, &edited, 80..128, 0..128);
    let changed = diff(&red, &edited, 40..64, 40..88);
    eprintln!(
        "mean |difference|: kept half {kept:.1} levels, the repainted half of the circle {changed:.1}"
    );
    assert!(kept < 6.0, "the kept half moved by {kept:.1} levels");
    assert!(
        changed > 10.0 * kept,
        "the repainted circle moved by only {changed:.1}"
    );
}

#[test]
fn an_edit_whose_image_is_not_the_request_size_is_refused() {
    let mut p = shipped();
    let req = GenerationRequest {
        loras: Vec::new(),
        prompt: "a red circle".into(),
        width: 128,
        height: 128,
        steps: 4,
        guidance: None,
        seed: 1,
        n: 1,
        previews: 0,
        edit: Some(Arc::new(EditInput {
            image: RgbImage {
                width: 64,
                height: 64,
                pixels: vec![255; 64 * 64 * 3],
            },
            mask: None,
            strength: 0.5,
            image_sha256: String::new(),
        })),
    };
    let err = p
        .generate_batch(&[req], &mut |_| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(err.contains("image") && err.contains("64x64"), "{err}");
}
