//! `GET /v1/models` and `GET /v1/models/{id}` in OpenAI's list shape; aliases appear as
//! entries of their own, with an `alias_of` extension field.

use axum::{
    Json,
    extract::{Path, State},
};
use serde_json::{Value, json};

use crate::{auth::Caller, error::ApiError, state::AppState};

fn entries(state: &AppState) -> Vec<Value> {
    let mut out = Vec::new();
    for slot in state.models() {
        let spec = &slot.spec;
        let ready = slot.queue().is_some();
        out.push(json!({"id": spec.name, "object": "model", "created": spec.created, "owned_by": "pictor", "ready": ready}));
        for alias in &spec.aliases {
            out.push(json!({"id": alias, "object": "model", "created": spec.created, "owned_by": "pictor",
                            "alias_of": spec.name, "ready": ready}));
        }
    }
    out
}

/// `GET /v1/models`.
pub async fn list(State(state): State<AppState>, _: Caller) -> Json<Value> {
    Json(json!({"object": "list", "data": entries(&state)}))
}

/// `GET /v1/models/{id}`.
pub async fn get(
    State(state): State<AppState>,
    _: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    entries(&state)
        .into_iter()
        .find(|e| e["id"] == id.as_str())
        .map(Json)
        .ok_or(ApiError::ModelNotFound(id))
}
