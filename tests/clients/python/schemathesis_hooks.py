"""Schemathesis hooks for `test_schemathesis.py`: the built-in positive-data check, made to
know the one kind of refusal a static schema cannot rule out.

A request can match the schema and still break its model's own rules: a size off the
model's 16-pixel grid or past its pixel budget, a guidance scale for a model without a
guidance input, a LoRA name the server has no file for (or one made for another model),
too few steps for an edit's strength, a seed that `seed + n - 1` pushes past 2^53 - 1,
or bytes in `image` that are no image. Or a rule across a header and the body: an
`Idempotency-Key` on a streamed request (a stream cannot be replayed). The server answers
those 400 with `param` naming the field. Every other refusal of a schema-valid request still
fails the run."""

import json

import schemathesis

MODEL_RULES = {"size", "steps", "guidance_scale", "negative_prompt", "strength", "seed",
               "image", "mask", "Idempotency-Key", "loras"}


@schemathesis.check
def schema_valid_requests_are_accepted_unless_a_model_rule_refuses_them(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status < 400 or status in (401, 403, 404, 409, 429) or status >= 500:
        return None
    if status == 400:
        try:
            param = (json.loads(response.text).get("error") or {}).get("param")
        except ValueError:
            param = None
        if param in MODEL_RULES:
            return None
        raise AssertionError(f"a schema-valid request was refused on {param!r}: {response.text[:300]}")
    raise AssertionError(f"a schema-valid request got {status}: {response.text[:300]}")
