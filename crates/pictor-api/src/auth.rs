//! Bearer keys, as an extractor: a handler that takes [`Caller`] is authenticated.

use axum::{extract::FromRequestParts, http::request::Parts};
use pictor_store::ApiKey;

use crate::{error::ApiError, state::AppState};

/// Who is calling: a key, or nobody when the server is open (loopback, no key created yet).
/// An open server lets every request in, whatever bearer it carries: the OpenAI SDKs always
/// send one, and a newcomer's `Bearer YOUR_API_KEY` must not be a 401 on a server that said
/// it needs no key.
#[derive(Debug, Clone)]
pub struct Caller(pub Option<ApiKey>);

const NO_KEY: &str = "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).";

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if state.open().await? {
            return Ok(Self(None));
        }
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            return Err(ApiError::Unauthorized(NO_KEY.into()));
        };
        let secret = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "Malformed Authorization header: expected `Authorization: Bearer YOUR_KEY`."
                        .into(),
                )
            })?;
        match state.db().authenticate(secret).await? {
            Some(key) => Ok(Self(Some(key))),
            None => {
                // Never echo the secret; its first characters are enough to recognise it.
                let shown: String = secret.chars().take(6).collect();
                Err(ApiError::Unauthorized(format!(
                    "Incorrect API key provided: {shown}****. The key is unknown or has been revoked."
                )))
            }
        }
    }
}
