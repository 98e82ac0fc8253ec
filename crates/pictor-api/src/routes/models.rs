//! `GET /v1/models` and `GET /v1/models/{id}` in OpenAI's list shape; aliases appear as
//! entries of their own, with an `alias_of` extension field.

use axum::{
    Json,
    extract::{Path, State, rejection::PathRejection},
};

use crate::{
    auth::Caller,
    error::ApiError,
    openapi::{LoraFile, Model, ModelList},
    state::AppState,
};

fn entries(state: &AppState) -> Vec<Model> {
    let mut out = Vec::new();
    let loras: Vec<LoraFile> = match &state.0.config.lora_dir {
        Some(dir) => pictor_core::lora_files(dir)
            .into_iter()
            .map(|(name, bytes)| LoraFile { name, bytes })
            .collect(),
        None => Vec::new(),
    };
    for slot in state.models() {
        let spec = &slot.spec;
        let loaded = slot.loaded();
        let entry = |id: &str, alias_of: Option<String>| Model {
            id: id.to_string(),
            object: "model",
            created: spec.created,
            owned_by: "pictor",
            alias_of,
            ready: loaded.is_some(),
            hash: slot.hash().map(str::to_string),
            memory: loaded.map(|l| l.memory.clone()),
            device: loaded.and_then(|l| l.queue.device().map(str::to_string)),
            rules: loaded.map(|l| (&l.rules).into()),
            loras: loaded
                .filter(|l| l.rules.takes_loras)
                .map(|_| loras.clone()),
        };
        out.push(entry(&spec.name, None));
        for alias in &spec.aliases {
            out.push(entry(alias, Some(spec.name.clone())));
        }
    }
    out
}

/// `GET /v1/models`.
pub(crate) async fn list(State(state): State<AppState>, _: Caller) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: entries(&state),
    })
}

/// `GET /v1/models/{id}`.
pub(crate) async fn get(
    State(state): State<AppState>,
    _: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Model>, ApiError> {
    let Path(id) = id.map_err(|_| ApiError::NotFound("No such model.".into()))?;
    entries(&state)
        .into_iter()
        .find(|e| e.id == id)
        .map(Json)
        .ok_or_else(|| state.model_not_found(&id))
}
