//! The receipt embedded in every image: the `parameters` text that image tools write and
//! read (`prompt`, then a line `Steps: …, Seed: …, Size: WxH, Model: …`), and its parser,
//! so an image can be reproduced from its own file (`pictor generate --from-image`).

use pictor_core::{Dimensions, Generation, GenerationRequest, LoraUse};

use crate::{Error, Result};

/// What made an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    /// The prompt really encoded.
    pub prompt: String,
    /// Denoising steps.
    pub steps: usize,
    /// The guidance scale, for a model with a guidance input (FLUX.1-dev's distilled
    /// guidance; written as Forge does, `Distilled CFG Scale`).
    pub guidance: Option<f64>,
    /// This image's seed.
    pub seed: u64,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// The model's name.
    pub model: String,
    /// A short hash of the model's weight files, when known.
    pub model_hash: Option<String>,
    /// For an edit: how far from the input it went (A1111's `Denoising strength`).
    pub strength: Option<f64>,
    /// For an edit: the SHA-256 (hex) of the input image's file.
    pub input_sha256: Option<String>,
    /// Where it was drawn and in which dtype (`cuda:0 (NVIDIA H100 80GB HBM3) bf16`), when
    /// known: the same seed gives the same image on the same device and dtype.
    pub device: Option<String>,
    /// The LoRAs applied: name, scale and the file's SHA-256 (its first 12 hex digits
    /// when read back from an image, as A1111's `Lora hashes` carry them).
    pub loras: Vec<LoraUse>,
}

/// The hex digits of a LoRA's hash that receipts keep.
const LORA_HASH_DIGITS: usize = 12;

/// `line` split at `, ` except inside double quotes.
fn split_outside_quotes(line: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => quoted = !quoted,
            b',' if !quoted && bytes.get(i + 1) == Some(&b' ') => {
                parts.push(&line[start..i]);
                start = i + 2;
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&line[start..]);
    parts
}

impl Receipt {
    /// The receipt of image `index` of `req`'s result: the prompt its encoder really saw,
    /// its own seed (`seed + index`), steps and size, and the model and device that drew it.
    pub fn new(
        req: &GenerationRequest,
        generation: &Generation,
        index: usize,
        model: &str,
        model_hash: Option<&str>,
    ) -> Self {
        Self {
            prompt: generation.prompt.encoded.clone(),
            steps: req.steps,
            guidance: req.guidance,
            seed: req.seed.wrapping_add(index as u64),
            width: req.width,
            height: req.height,
            model: model.to_string(),
            model_hash: model_hash.map(str::to_string),
            strength: req.edit.as_ref().map(|e| e.strength),
            input_sha256: req.edit.as_ref().map(|e| e.image_sha256.clone()),
            device: Some(generation.device.clone()).filter(|d| !d.is_empty()),
            loras: generation.loras.clone(),
        }
    }

    /// The `parameters` text.
    pub fn to_parameters(&self) -> String {
        format!(
            "{}\nSteps: {}, Sampler: Euler (flow matching), CFG scale: 0, {}Seed: {}, Size: {}x{}, {}{}{}{}{}Model: {}, Version: pictor {}",
            self.prompt,
            self.steps,
            self.guidance
                .map(|g| format!("Distilled CFG Scale: {g}, "))
                .unwrap_or_default(),
            self.seed,
            self.width,
            self.height,
            self.strength
                .map(|s| format!("Denoising strength: {s}, "))
                .unwrap_or_default(),
            self.input_sha256
                .as_ref()
                .map(|h| format!("Input SHA256: {h}, "))
                .unwrap_or_default(),
            self.model_hash
                .as_ref()
                .map(|h| format!("Model hash: {h}, "))
                .unwrap_or_default(),
            self.device
                .as_ref()
                .map(|d| format!("Device: {}, ", d.replace(", ", " ")))
                .unwrap_or_default(),
            self.lora_fields(),
            self.model,
            env!("CARGO_PKG_VERSION")
        )
    }

    /// A1111's `Lora hashes: "name: hash, ..."` and, as it keeps the scales in the
    /// prompt's `<lora:name:scale>` tags, `Lora scales: "name: scale, ..."`.
    fn lora_fields(&self) -> String {
        if self.loras.is_empty() {
            return String::new();
        }
        let list = |f: &dyn Fn(&LoraUse) -> String| {
            self.loras
                .iter()
                .map(|l| format!("{}: {}", l.name, f(l)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "Lora hashes: \"{}\", Lora scales: \"{}\", ",
            list(&|l| l.sha256.chars().take(LORA_HASH_DIGITS).collect()),
            list(&|l| l.scale.to_string())
        )
    }

    /// Parses a `parameters` text; `None` when it lacks steps, seed or size.
    pub fn parse(text: &str) -> Option<Self> {
        let (prompt, line) = text.rsplit_once('\n')?;
        let parts = split_outside_quotes(line);
        let field = |key: &str| {
            parts
                .iter()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix(": "))
                .map(|v| v.trim_matches('"').to_string())
        };
        let pairs = |key: &str| -> Vec<(String, String)> {
            field(key)
                .unwrap_or_default()
                .split(", ")
                .filter_map(|p| p.split_once(": "))
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let scales = pairs("Lora scales");
        let loras = pairs("Lora hashes")
            .into_iter()
            .map(|(name, sha256)| LoraUse {
                scale: scales
                    .iter()
                    .find(|(n, _)| *n == name)
                    .and_then(|(_, s)| s.parse().ok())
                    .unwrap_or(1.0),
                name,
                sha256,
            })
            .collect();
        let Dimensions { width, height } = field("Size")?.parse().ok()?;
        Some(Self {
            prompt: prompt.to_string(),
            steps: field("Steps")?.parse().ok()?,
            guidance: field("Distilled CFG Scale").and_then(|g| g.parse().ok()),
            seed: field("Seed")?.parse().ok()?,
            width,
            height,
            model: field("Model").unwrap_or_default(),
            model_hash: field("Model hash"),
            strength: field("Denoising strength").and_then(|s| s.parse().ok()),
            input_sha256: field("Input SHA256"),
            device: field("Device"),
            loras,
        })
    }

    /// The receipt of an image file: PNG (`parameters` text chunk), JPEG or WebP (EXIF
    /// `UserComment`).
    pub fn from_image(bytes: &[u8]) -> Result<Self> {
        if bytes.starts_with(b"\x89PNG") {
            return Self::from_png(bytes);
        }
        let format = image::guess_format(bytes)?;
        let text = exif_user_comment(bytes, format)?;
        Self::parse(&text).ok_or(Error::NoReceipt(
            "the EXIF UserComment has no Steps, Seed and Size",
        ))
    }

    /// Reads the receipt from a PNG's `parameters` chunk (tEXt, zTXt or iTXt).
    pub fn from_png(bytes: &[u8]) -> Result<Self> {
        let reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info()?;
        let info = reader.info();
        let text = info
            .uncompressed_latin1_text
            .iter()
            .find(|c| c.keyword == "parameters")
            .map(|c| c.text.clone())
            .or_else(|| {
                info.utf8_text
                    .iter()
                    .find(|c| c.keyword == "parameters")
                    .and_then(|c| c.get_text().ok())
            })
            .or_else(|| {
                info.compressed_latin1_text
                    .iter()
                    .find(|c| c.keyword == "parameters")
                    .and_then(|c| c.get_text().ok())
            })
            .ok_or(Error::NoReceipt("the PNG has no `parameters` text chunk"))?;
        Self::parse(&text).ok_or(Error::NoReceipt(
            "the `parameters` text has no Steps, Seed and Size",
        ))
    }
}

/// The EXIF `UserComment` of a JPEG or WebP file, decoded by its charset code.
fn exif_user_comment(bytes: &[u8], format: image::ImageFormat) -> Result<String> {
    use image::ImageDecoder as _;
    let cursor = std::io::Cursor::new(bytes);
    let tiff = match format {
        image::ImageFormat::Jpeg => {
            image::codecs::jpeg::JpegDecoder::new(cursor)?.exif_metadata()?
        }
        image::ImageFormat::WebP => {
            image::codecs::webp::WebPDecoder::new(cursor)?.exif_metadata()?
        }
        _ => {
            return Err(Error::NoReceipt(
                "only PNG, JPEG and WebP files carry a receipt",
            ));
        }
    }
    .ok_or(Error::NoReceipt("the image has no EXIF metadata"))?;
    let exif = exif::Reader::new().read_raw(tiff)?;
    let field = exif
        .get_field(exif::Tag::UserComment, exif::In::PRIMARY)
        .ok_or(Error::NoReceipt("the EXIF metadata has no UserComment"))?;
    let exif::Value::Undefined(raw, _) = &field.value else {
        return Err(Error::NoReceipt(
            "the EXIF UserComment is not of type UNDEFINED",
        ));
    };
    let (code, text) = raw.split_at(raw.len().min(8));
    Ok(match code {
        b"UNICODE\0" => {
            // UTF-16 in the file's byte order, as the standard says; big-endian in practice.
            let units: Vec<u16> = text
                .chunks_exact(2)
                .map(|c| {
                    if exif.little_endian() {
                        u16::from_le_bytes([c[0], c[1]])
                    } else {
                        u16::from_be_bytes([c[0], c[1]])
                    }
                })
                .collect();
            String::from_utf16(&units)?
        }
        _ => String::from_utf8_lossy(text).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_including_multi_line_and_comma_prompts() {
        let r = Receipt {
            prompt: "a cat, on a mat\nin colour: red".into(),
            steps: 4,
            guidance: None,
            seed: u64::MAX,
            width: 512,
            height: 256,
            model: "flux-1-schnell".into(),
            model_hash: Some("0123abcdef".into()),
            strength: None,
            input_sha256: None,
            device: Some("cuda:0 (NVIDIA H100 80GB HBM3) bf16".into()),
            loras: Vec::new(),
        };
        assert_eq!(Receipt::parse(&r.to_parameters()), Some(r.clone()));
        let edit = Receipt {
            guidance: Some(3.5),
            strength: Some(0.75),
            input_sha256: Some("ab".repeat(32)),
            ..r.clone()
        };
        assert_eq!(Receipt::parse(&edit.to_parameters()), Some(edit));
        // LoRAs: A1111's quoted `Lora hashes` (12 digits kept) and their scales.
        let lora = |name: &str, scale: f64| LoraUse {
            name: name.into(),
            sha256: "0123456789abcdef".repeat(4),
            scale,
        };
        let with = Receipt {
            loras: vec![lora("pixel-art", 0.8), lora("ink.v2", -0.25)],
            ..r
        };
        let text = with.to_parameters();
        assert!(
            text.contains("Lora hashes: \"pixel-art: 0123456789ab, ink.v2: 0123456789ab\""),
            "{text}"
        );
        let back = Receipt::parse(&text).unwrap();
        assert_eq!(back.model, "flux-1-schnell");
        let got: Vec<(&str, &str, f64)> = back
            .loras
            .iter()
            .map(|l| (l.name.as_str(), l.sha256.as_str(), l.scale))
            .collect();
        assert_eq!(
            got,
            [
                ("pixel-art", "0123456789ab", 0.8),
                ("ink.v2", "0123456789ab", -0.25)
            ]
        );
        assert_eq!(Receipt::parse("just a prompt"), None);
    }

    #[test]
    fn every_format_carries_the_receipt() {
        use crate::encode::{Format, encode};
        let r = Receipt {
            prompt: "un café, s'il vous plaît — ☕".into(),
            steps: 3,
            guidance: Some(2.25),
            seed: 42,
            width: 16,
            height: 8,
            model: "m".into(),
            model_hash: None,
            strength: Some(0.5),
            input_sha256: Some("cd".repeat(32)),
            device: None,
            loras: Vec::new(),
        };
        let img = pictor_core::RgbImage {
            width: 16,
            height: 8,
            pixels: vec![200; 16 * 8 * 3],
        };
        for format in [Format::Png, Format::Jpeg, Format::Webp] {
            let bytes = encode(&img, format, 90, &r.to_parameters()).expect("encodes");
            let back = Receipt::from_image(&bytes).unwrap_or_else(|e| panic!("{format:?}: {e:#}"));
            assert_eq!(back, r, "{format:?}");
            assert!(
                image::load_from_memory(&bytes).is_ok(),
                "{format:?} still decodes"
            );
        }
        let bare = encode(&img, Format::Jpeg, 90, "").expect("encodes");
        assert!(
            Receipt::from_image(&bare).is_err(),
            "no receipt, a clear error"
        );
    }
}
