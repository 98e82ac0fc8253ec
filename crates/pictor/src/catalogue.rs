//! The models `pictor models pull NAME` knows by name: where each lives on the Hugging Face
//! Hub and which of its files Pictor needs. One place: the pull command and the server's
//! "model not found" hints both read it.

/// What one repository gives a catalogue model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A model folder (diffusers layout): served from the cache by its repo id, or, next to
    /// a [`Role::Transformer`], the source of every other part.
    Folder,
    /// One transformer file (a GGUF quantization) used in place of the folder's.
    Transformer,
}

/// One repository and the files (glob patterns, `*` crossing folders) taken from it.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub repo: &'static str,
    pub include: &'static [&'static str],
    pub role: Role,
}

/// A model known by name.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// What a user types: `flux-1-schnell`, `flux-1-schnell:q4_k`.
    pub name: &'static str,
    /// The model's own name, as clients also write it (`FLUX.1-schnell`).
    pub family: &'static str,
    /// One line for `--list`.
    pub about: &'static str,
    pub sources: &'static [Source],
}

impl Entry {
    /// The name it is served under by default: the part before any `:` tag, so the
    /// OpenAI SDKs' `model="flux-1-schnell"` finds whichever quantization was pulled.
    pub fn served_name(&self) -> &'static str {
        self.name.split(':').next().unwrap_or(self.name)
    }
}

const FLUX_PARTS: &[&str] = &[
    "text_encoder/*",
    "text_encoder_2/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "vae/*",
];
const FLUX_FOLDER: &[&str] = &[
    "model_index.json",
    "scheduler/*",
    "text_encoder/*",
    "text_encoder_2/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "transformer/*",
    "vae/*",
];

macro_rules! flux_gguf {
    ($name:literal, $family:literal, $base:literal, $gguf_repo:literal, $pattern:literal, $about:literal) => {
        Entry {
            name: $name,
            family: $family,
            about: $about,
            sources: &[
                Source {
                    repo: $base,
                    include: FLUX_PARTS,
                    role: Role::Folder,
                },
                Source {
                    repo: $gguf_repo,
                    include: &[$pattern],
                    role: Role::Transformer,
                },
            ],
        }
    };
}

/// Every model known by name.
pub const ENTRIES: &[Entry] = &[
    Entry {
        name: "flux-1-schnell",
        family: "FLUX.1-schnell",
        about: "FLUX.1 [schnell], 4 steps, Apache-2.0; the diffusers folder in bf16 (about 34 GB)",
        sources: &[Source {
            repo: "black-forest-labs/FLUX.1-schnell",
            include: FLUX_FOLDER,
            role: Role::Folder,
        }],
    },
    flux_gguf!(
        "flux-1-schnell:q8_0",
        "FLUX.1-schnell",
        "black-forest-labs/FLUX.1-schnell",
        "city96/FLUX.1-schnell-gguf",
        "*-Q8_0.gguf",
        "FLUX.1 [schnell] with city96's Q8_0 GGUF transformer (near lossless, about 22 GB in all)"
    ),
    flux_gguf!(
        "flux-1-schnell:q4_k",
        "FLUX.1-schnell",
        "black-forest-labs/FLUX.1-schnell",
        "city96/FLUX.1-schnell-gguf",
        "*-Q4_K_S.gguf",
        "FLUX.1 [schnell] with city96's Q4_K_S GGUF transformer (about 17 GB in all)"
    ),
    Entry {
        name: "flux-1-dev",
        family: "FLUX.1-dev",
        about: "FLUX.1 [dev], 28 steps, non-commercial licence (gated: accept it on the Hub, set HF_TOKEN)",
        sources: &[Source {
            repo: "black-forest-labs/FLUX.1-dev",
            include: FLUX_FOLDER,
            role: Role::Folder,
        }],
    },
    flux_gguf!(
        "flux-1-dev:q8_0",
        "FLUX.1-dev",
        "black-forest-labs/FLUX.1-dev",
        "city96/FLUX.1-dev-gguf",
        "*-Q8_0.gguf",
        "FLUX.1 [dev] with city96's Q8_0 GGUF transformer (gated: HF_TOKEN)"
    ),
    flux_gguf!(
        "flux-1-dev:q4_k",
        "FLUX.1-dev",
        "black-forest-labs/FLUX.1-dev",
        "city96/FLUX.1-dev-gguf",
        "*-Q4_K_S.gguf",
        "FLUX.1 [dev] with city96's Q4_K_S GGUF transformer (gated: HF_TOKEN)"
    ),
    Entry {
        name: "z-image-turbo",
        family: "Z-Image-Turbo",
        about: "Z-Image-Turbo (Tongyi-MAI), 8 steps, Apache-2.0; the diffusers folder in bf16 (about 21 GB)",
        sources: &[Source {
            repo: "Tongyi-MAI/Z-Image-Turbo",
            include: &[
                "model_index.json",
                "scheduler/*",
                "text_encoder/*",
                "tokenizer/*",
                "transformer/*",
                "vae/*",
            ],
            role: Role::Folder,
        }],
    },
];

/// The entry `name` names exactly.
pub fn find(name: &str) -> Option<&'static Entry> {
    ENTRIES.iter().find(|e| e.name == name)
}

/// The entry a client's model name most likely means (its name or its family's, loosely,
/// as the server's "model not found" hints match them), preferring the full-precision one.
pub fn guess(name: &str) -> Option<&'static Entry> {
    use pictor_core::loose_model_name as loose;
    let wanted = loose(name);
    ENTRIES
        .iter()
        .find(|e| loose(e.name) == wanted)
        .or_else(|| ENTRIES.iter().find(|e| loose(e.family) == wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_variants_serve_under_the_base_name() {
        for (i, a) in ENTRIES.iter().enumerate() {
            assert!(
                ENTRIES[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
            assert_eq!(
                a.sources.iter().filter(|s| s.role == Role::Folder).count(),
                1,
                "{}",
                a.name
            );
        }
        assert_eq!(
            find("flux-1-schnell:q4_k").unwrap().served_name(),
            "flux-1-schnell"
        );
        assert_eq!(guess("FLUX.1-schnell").unwrap().name, "flux-1-schnell");
        assert_eq!(guess("flux-1-dev:Q8_0").unwrap().name, "flux-1-dev:q8_0");
        assert_eq!(guess("Z-Image-Turbo").unwrap().name, "z-image-turbo");
        assert!(guess("sdxl-turbo").is_none());
    }
}
