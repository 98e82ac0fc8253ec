//! The engine's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model or generating.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor is missing or has the wrong shape or type.
    #[error("{path}: tensor `{tensor}`: {problem}")]
    Tensor {
        /// The file (or files) searched.
        path: PathBuf,
        /// The tensor name, as the file spells it.
        tensor: String,
        /// What is wrong.
        problem: String,
    },
    /// The files were found but their layout is not one the engine knows.
    #[error("{path}: unknown layout: {message}")]
    UnknownLayout {
        /// The file or folder.
        path: PathBuf,
        /// What was seen and what was expected.
        message: String,
    },
    /// No model could be found where the caller pointed.
    #[error("model not found: {0}")]
    NotFound(String),
    /// A part of the model failed to build from its weights.
    #[error("loading {part}: {message}")]
    Load {
        /// Which part (transformer, vae, clip, t5, tokenizer).
        part: &'static str,
        /// What failed, with file and tensor where known.
        message: String,
    },
    /// The request cannot be served by this model (size, steps, n...).
    #[error("invalid {field}: {message}")]
    InvalidInput {
        /// The request field that is wrong.
        field: &'static str,
        /// Why, with the bound.
        message: String,
    },
    /// The parts were each read, but they do not fit together (widths from different
    /// models).
    #[error("the model's parts do not fit together: {message}")]
    Mismatch {
        /// Which parts, with the numbers that disagree.
        message: String,
    },
    /// The model does not fit in the memory budget, even staged.
    #[error("not enough memory: {message}")]
    OutOfMemory {
        /// Which part, its size, the budget, and what to do.
        message: String,
    },
    /// The device asked for cannot be used (no CUDA in this build, no driver, no such
    /// GPU, a driver too old).
    #[error("{0}")]
    Device(String),
    /// The caller cancelled the generation.
    #[error("generation cancelled")]
    Cancelled,
    /// A tensor computation failed.
    #[error("computation failed: {0}")]
    Compute(#[from] candle_core::Error),
}

impl EngineError {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub(crate) fn load(part: &'static str, err: impl std::fmt::Display) -> Self {
        Self::Load {
            part,
            message: err.to_string(),
        }
    }
}

impl From<EngineError> for pictor_core::PipelineError {
    /// What callers of the seam must tell apart (a cancel, a refused request) stays
    /// apart; every other failure travels whole as the source.
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Cancelled => Self::Cancelled,
            EngineError::InvalidInput { field, message } => {
                Self::Invalid(pictor_core::Invalid::new(field, message))
            }
            other => Self::Failed(Box::new(other)),
        }
    }
}

impl From<pictor_core::Invalid> for EngineError {
    fn from(e: pictor_core::Invalid) -> Self {
        Self::InvalidInput {
            field: e.param,
            message: e.message,
        }
    }
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
