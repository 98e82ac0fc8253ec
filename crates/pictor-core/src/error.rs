//! What a pipeline can fail with, as its callers need to tell the cases apart.

/// A request that breaks a model's rules; `param` names the request field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    /// The request field: `size`, `steps`, `n`, ...
    pub param: &'static str,
    /// What is wrong, with the bound.
    pub message: String,
}

impl Invalid {
    /// A violation of `param`.
    pub fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param,
            message: message.into(),
        }
    }
}

/// Why a [`crate::Pipeline`] call produced no images.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The request breaks the model's rules.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The progress callback answered [`crate::Control::Cancel`].
    #[error("generation cancelled")]
    Cancelled,
    /// The model failed (a load or compute error); the source says where.
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// The seam's result type.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
