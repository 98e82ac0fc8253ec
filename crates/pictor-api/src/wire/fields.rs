//! Typed reads of a request's fields, each error naming its `param`. A JSON body is held to
//! its JSON types; a form's fields all arrive as text, so there `"2"` is the integer 2 and
//! `"true"` the boolean, as form encoders (LiteLLM, the SDKs' multipart bodies) send them.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// The fields of one request.
pub(super) struct Fields<'a> {
    map: &'a Map<String, Value>,
    /// Fields came from a form: numbers and booleans arrive as text.
    form: bool,
}

fn type_error(param: &str, want: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null".to_string(),
        Value::Bool(_) => "a boolean".to_string(),
        Value::Number(_) => "a number".to_string(),
        Value::String(s) if s.chars().count() <= 40 => format!("'{s}'"),
        Value::String(_) => "a string".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    };
    ApiError::invalid(
        param,
        format!("Invalid type for '{param}': expected {want}, but got {got}."),
    )
}

impl<'a> Fields<'a> {
    /// A JSON body's fields.
    pub(super) fn json(map: &'a Map<String, Value>) -> Self {
        Self { map, form: false }
    }

    /// A form's text fields.
    pub(super) fn form(map: &'a Map<String, Value>) -> Self {
        Self { map, form: true }
    }

    /// Every field as sent.
    pub(super) fn map(&self) -> &Map<String, Value> {
        self.map
    }

    /// Whether the fields came from a form (all text).
    pub(super) fn is_form(&self) -> bool {
        self.form
    }

    /// Whether `key` was sent at all (`null` included, as JSON Schema's `required` counts).
    pub(super) fn sent(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// The value of `key`, treating `null` as absent (a form has none: an empty form field
    /// is the empty string, refused where that is no valid value, as in a JSON body).
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn string(&self, key: &str) -> Result<Option<&str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(type_error(key, "a string", other)),
        }
    }

    pub(super) fn integer(&self, key: &str) -> Result<Option<i64>, ApiError> {
        let not_integer = |shown: &dyn std::fmt::Display| {
            ApiError::invalid(
                key,
                format!("Invalid '{key}': expected an integer, got {shown}."),
            )
        };
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                        .map(|f| f as i64)
                })
                .map(Some)
                .ok_or_else(|| not_integer(n)),
            Some(Value::String(s)) if self.form => s
                .trim()
                .parse::<i64>()
                .map(Some)
                .map_err(|_| not_integer(&format_args!("'{s}'"))),
            Some(other) => Err(type_error(key, "an integer", other)),
        }
    }

    pub(super) fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) if self.form => match s.trim().parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(Some(v)),
                _ => Err(ApiError::invalid(
                    key,
                    format!("Invalid '{key}': expected a number, got '{s}'."),
                )),
            },
            Some(other) => Err(type_error(key, "a number", other)),
        }
    }

    pub(super) fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if self.form => match s.trim() {
                t if t.eq_ignore_ascii_case("true") || t == "1" => Ok(Some(true)),
                f if f.eq_ignore_ascii_case("false") || f == "0" => Ok(Some(false)),
                _ => Err(ApiError::invalid(
                    key,
                    format!("Invalid '{key}': expected true or false, got '{s}'."),
                )),
            },
            Some(other) => Err(type_error(key, "a boolean", other)),
        }
    }

    /// One of `choices`, returning its index.
    pub(super) fn choice(&self, key: &str, choices: &[&str]) -> Result<Option<usize>, ApiError> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        choices
            .iter()
            .position(|c| *c == s)
            .map(Some)
            .ok_or_else(|| {
                let list = choices
                    .iter()
                    .map(|c| format!("'{c}'"))
                    .collect::<Vec<_>>()
                    .join(", ");
                ApiError::invalid(
                    key,
                    format!("Invalid value: '{s}'. Supported values are: {list}."),
                )
            })
    }

    pub(super) fn in_range(&self, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.integer(key)? {
            Some(v) if v < lo || v > hi => Err(ApiError::invalid(
                key,
                format!("Invalid '{key}': {v} is out of range; it must be between {lo} and {hi}."),
            )),
            v => Ok(v),
        }
    }
}
