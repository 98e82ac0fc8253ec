"""LiteLLM (the proxy library many deployments put in front of providers) against a running
`pictor serve`, the way its users configure an OpenAI-compatible image provider:
`model="openai/<name>"` with `api_base` and `api_key`."""

import base64
import os
import urllib.request

# LiteLLM fetches its model price map from the internet on import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402

MODEL = "openai/tiny-flux-schnell"


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def generate(server, **kw):
    return litellm.image_generation(model=MODEL, prompt="a red circle on a blue background",
                                    api_base=server["url"] + "/v1", api_key=server["key"], size="64x64", **kw)


def test_litellm_default_url(server):
    r = generate(server)
    assert r.data[0].url.startswith(server["url"])
    with urllib.request.urlopen(r.data[0].url) as f:
        assert png_size(f.read()) == (64, 64)


def test_litellm_b64_json_through_extra_body(server):
    # LiteLLM drops `response_format` for openai/ image models client-side; passing it in
    # extra_body reaches the server unchanged (the README says so).
    r = generate(server, extra_body={"response_format": "b64_json"})
    assert png_size(base64.b64decode(r.data[0].b64_json)) == (64, 64)


def test_litellm_image_edit_with_a_mask(server):
    # LiteLLM posts every image as `image[]` and the mask as `mask`, numbers as text.
    from pngs import disc, left_half_mask, size_of

    r = litellm.image_edit(model=MODEL, image=disc(64, 64), mask=left_half_mask(64, 64),
                           prompt="a blue disc", n=2, size="64x64",
                           api_base=server["url"] + "/v1", api_key=server["key"],
                           extra_body={"response_format": "b64_json", "steps": 2})
    assert len(r.data) == 2
    assert size_of(base64.b64decode(r.data[0].b64_json)) == (64, 64)
