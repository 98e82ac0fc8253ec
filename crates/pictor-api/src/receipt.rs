//! The receipt embedded in every image: the `parameters` text that image tools write and
//! read (`prompt`, then a line `Steps: …, Seed: …, Size: WxH, Model: …`), and its parser,
//! so an image can be reproduced from its own file (`pictor generate --from-image`).

/// What made an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The prompt really encoded.
    pub prompt: String,
    /// Denoising steps.
    pub steps: usize,
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
}

impl Receipt {
    /// The `parameters` text.
    pub fn to_parameters(&self) -> String {
        format!(
            "{}\nSteps: {}, Sampler: Euler (flow matching), CFG scale: 0, Seed: {}, Size: {}x{}, {}Model: {}, Version: pictor {}",
            self.prompt,
            self.steps,
            self.seed,
            self.width,
            self.height,
            self.model_hash
                .as_ref()
                .map(|h| format!("Model hash: {h}, "))
                .unwrap_or_default(),
            self.model,
            env!("CARGO_PKG_VERSION")
        )
    }

    /// Parses a `parameters` text; `None` when it lacks steps, seed or size.
    pub fn parse(text: &str) -> Option<Self> {
        let (prompt, line) = text.rsplit_once('\n')?;
        let field = |key: &str| {
            line.split(", ")
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix(": "))
                .map(str::to_string)
        };
        let (width, height) = crate::wire::dimensions(&field("Size")?)?;
        Some(Self {
            prompt: prompt.to_string(),
            steps: field("Steps")?.parse().ok()?,
            seed: field("Seed")?.parse().ok()?,
            width,
            height,
            model: field("Model").unwrap_or_default(),
            model_hash: field("Model hash"),
        })
    }

    /// Reads the receipt from a PNG's `parameters` chunk (tEXt, zTXt or iTXt).
    pub fn from_png(bytes: &[u8]) -> anyhow::Result<Self> {
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
            .ok_or_else(|| anyhow::anyhow!("the PNG has no `parameters` text chunk"))?;
        Self::parse(&text)
            .ok_or_else(|| anyhow::anyhow!("the `parameters` text has no Steps, Seed and Size"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_including_multi_line_and_comma_prompts() {
        let r = Receipt {
            prompt: "a cat, on a mat\nin colour: red".into(),
            steps: 4,
            seed: u64::MAX,
            width: 512,
            height: 256,
            model: "flux-1-schnell".into(),
            model_hash: Some("0123abcdef".into()),
        };
        assert_eq!(Receipt::parse(&r.to_parameters()), Some(r));
        assert_eq!(Receipt::parse("just a prompt"), None);
    }
}
