//! The one API error type and its OpenAI-shaped body:
//! `{"error": {"message", "type", "param", "code"}}`.

use std::time::Duration;

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::openapi::{ErrorBody, ErrorResponse};

/// Everything a request can fail with; the status, `type`, `param` and `code` all come
/// from [`ApiError::parts`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is wrong; `param` names the field.
    #[error("{message}")]
    Invalid {
        /// What is wrong, with the bound.
        message: String,
        /// The offending field, if one.
        param: Option<String>,
    },
    /// 401: no key, a malformed header, or an unknown or revoked key.
    #[error("{0}")]
    Unauthorized(String),
    /// 404: no such model; `help` lists the models served and, for a model this server
    /// could serve, what to do.
    #[error("The model `{model}` does not exist or you do not have access to it. {help}")]
    ModelNotFound {
        /// The name asked for.
        model: String,
        /// What is served instead, and how to serve the one asked for when that is known.
        help: String,
    },
    /// 404: no such route or image.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists, the method does not.
    #[error("The method {0} is not allowed on this URL. Please check the URL and method.")]
    MethodNotAllowed(String),
    /// 408: the client sent its request too slowly.
    #[error("The request body did not arrive within {} s.", .0.as_secs())]
    RequestTimeout(Duration),
    /// 409: the `Idempotency-Key` was used with a different body.
    #[error(
        "This Idempotency-Key was already used with a different request body; use a new key for a new request."
    )]
    IdempotencyConflict,
    /// 413: the body is larger than the limit.
    #[error("Request body is larger than the limit of {0} bytes.")]
    PayloadTooLarge(usize),
    /// 413: one uploaded file is larger than the limit; `param` names its field.
    #[error("The file in '{param}' is larger than the limit of {limit} bytes.")]
    FileTooLarge {
        /// The form field.
        param: String,
        /// The limit per file.
        limit: usize,
    },
    /// 415: not the content type the route takes (which it names).
    #[error("Unsupported content type: send `Content-Type: {0}`.")]
    UnsupportedMediaType(&'static str),
    /// 429: the model's queue is full.
    #[error("The server is busy: the queue for model `{model}` is full. Retry after {} s.", retry_after.as_secs())]
    Overloaded {
        /// The model.
        model: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// 429: the API key's rate limit (`kind` is `requests` or `images`).
    #[error("Rate limit reached for {kind} per minute: limit {limit}. Please try again in {:.1} s.", retry_after.as_secs_f64())]
    RateLimited {
        /// `requests` or `images`.
        kind: &'static str,
        /// The per-minute limit.
        limit: u32,
        /// When enough is back.
        retry_after: Duration,
        /// The `x-ratelimit-*` headers.
        headers: crate::ratelimit::RateHeaders,
    },
    /// 503: loading, or shutting down.
    #[error("{message}")]
    Unavailable {
        /// Why.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// 504: the generation ran past the server's deadline.
    #[error("The generation took longer than the server's limit of {} s.", .0.as_secs())]
    Timeout(Duration),
    /// 500: a fault of ours; the details are logged, never sent.
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// The 503 for new work while the server shuts down.
    pub fn shutting_down() -> Self {
        Self::Unavailable {
            message: "The server is shutting down.".into(),
            retry_after: Duration::from_secs(5),
        }
    }

    /// A 400 about the body as a whole.
    pub fn invalid_body(message: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
            param: None,
        }
    }

    /// Status, `type`, `param`, `code`.
    fn parts(
        &self,
    ) -> (
        StatusCode,
        &'static str,
        Option<String>,
        Option<&'static str>,
    ) {
        use ApiError::*;
        match self {
            Invalid { param, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                param.clone(),
                None,
            ),
            Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
            ModelNotFound { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model".into()),
                Some("model_not_found"),
            ),
            NotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                Some("not_found"),
            ),
            MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                None,
                Some("method_not_allowed"),
            ),
            RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                None,
                Some("request_timeout"),
            ),
            IdempotencyConflict => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("Idempotency-Key".into()),
                Some("idempotency_key_reused"),
            ),
            PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                None,
                Some("payload_too_large"),
            ),
            FileTooLarge { param, .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some(param.clone()),
                Some("file_too_large"),
            ),
            UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                None,
                Some("unsupported_media_type"),
            ),
            Overloaded { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                None,
                Some("queue_full"),
            ),
            RateLimited { kind, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                kind,
                None,
                Some("rate_limit_exceeded"),
            ),
            Unavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("unavailable"),
            ),
            Timeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                None,
                Some("timeout"),
            ),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
            ),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Overloaded { retry_after, .. }
            | Self::Unavailable { retry_after, .. }
            | Self::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::Internal(e)
    }
}

impl From<crate::ratelimit::Refused> for ApiError {
    fn from(r: crate::ratelimit::Refused) -> Self {
        use crate::ratelimit::Refused;
        match r {
            Refused::TooManyImages { images, limit } => Self::invalid(
                "n",
                format!(
                    "Invalid 'n': {images} images is more than this API key may generate in a minute ({limit})."
                ),
            ),
            Refused::Limited {
                kind,
                limit,
                retry_after,
                headers,
            } => Self::RateLimited {
                kind,
                limit,
                retry_after,
                headers,
            },
            Refused::Unreachable(e) => e.into(),
        }
    }
}

impl From<pictor_core::Invalid> for ApiError {
    fn from(e: pictor_core::Invalid) -> Self {
        Self::invalid(e.param, e.message)
    }
}

impl From<pictor_image::Error> for ApiError {
    fn from(e: pictor_image::Error) -> Self {
        Self::Internal(e.into())
    }
}

impl From<pictor_store::StoreError> for ApiError {
    /// A store out of reach is a 503 the client may retry (logged); any other store
    /// failure is ours.
    fn from(e: pictor_store::StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "a store is unavailable");
            return Self::Unavailable {
                message: format!("{} is unavailable; retry shortly.", e.store()),
                retry_after: std::time::Duration::from_secs(5),
            };
        }
        Self::Internal(e.into())
    }
}

impl ApiError {
    /// The OpenAI-shaped body; an internal error is logged here and described to the
    /// client only in general terms.
    pub fn body(&self) -> ErrorResponse {
        let (_, kind, param, code) = self.parts();
        let message = match self {
            Self::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "request failed");
                "The server had an error while processing your request.".to_string()
            }
            other => other.to_string(),
        };
        ErrorResponse {
            error: ErrorBody {
                message,
                kind,
                param,
                code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, ..) = self.parts();
        let mut response = (status, Json(self.body())).into_response();
        if matches!(self, Self::IdempotencyConflict) {
            // SDKs retry 409 by default; repeating this request can only fail again.
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if let Self::RateLimited { headers, .. } = &self {
            headers.apply(&mut response);
        }
        if let Some(after) = self.retry_after() {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            if let Ok(v) = HeaderValue::from_str(&after.as_millis().max(1).to_string()) {
                response.headers_mut().insert("retry-after-ms", v);
            }
        }
        response
    }
}
