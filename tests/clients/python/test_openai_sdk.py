"""The official `openai` Python SDK against a running `pictor serve`, unchanged."""

import base64
import io
import threading
import time
import urllib.request

import openai
import pytest
from openai import OpenAI

from pngs import idat

MODEL = "tiny-flux-schnell"


def client(server, **kw):
    return OpenAI(base_url=server["url"] + "/v1", api_key=server["key"], **kw)


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_url_response_downloads_a_png(server):
    r = client(server).images.generate(model=MODEL, prompt="a white siamese cat", size="64x64", response_format="url")
    assert len(r.data) == 1 and r.data[0].url.startswith(server["url"])
    assert r.data[0].revised_prompt == "a white siamese cat"
    with urllib.request.urlopen(r.data[0].url) as f:
        assert png_size(f.read()) == (64, 64)


def test_b64_json_with_n_2(server):
    r = client(server).images.generate(model="gpt-image-1", prompt="a red circle", size="64x48", n=2,
                                       response_format="b64_json")
    assert len(r.data) == 2
    images = [base64.b64decode(d.b64_json) for d in r.data]
    assert all(png_size(i) == (64, 48) for i in images)
    assert images[0] != images[1]


def test_same_seed_same_image(server):
    c = client(server)
    kw = dict(model=MODEL, prompt="a blue square", size="64x64", response_format="b64_json",
              extra_body={"seed": 1234, "steps": 2})
    assert c.images.generate(**kw).data[0].b64_json == c.images.generate(**kw).data[0].b64_json


def test_a_dev_model_takes_guidance_through_extra_body(server):
    c = client(server)
    kw = dict(model="tiny-flux-dev", prompt="a red circle", size="64x64", response_format="b64_json")
    default = c.images.generate(**kw, extra_body={"seed": 5, "steps": 4}).data[0]
    guided = c.images.generate(**kw, extra_body={"seed": 5, "steps": 4, "guidance_scale": 2.0}).data[0]
    assert default.model_extra["guidance"] == 3.5
    assert guided.model_extra["guidance"] == 2.0
    assert default.b64_json != guided.b64_json
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(**kw, extra_body={"guidance_scale": 31})
    assert e.value.param == "guidance_scale"
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(model=MODEL, prompt="x", size="64x64", extra_body={"guidance_scale": 2.0})
    assert e.value.param == "guidance_scale"
    rules = {m.id: m.model_extra.get("rules") for m in c.models.list()}
    assert rules["tiny-flux-dev"]["family"] == "FLUX.1-dev" and rules["tiny-flux-dev"]["default_guidance"] == 3.5
    assert rules[MODEL]["family"] == "FLUX.1-schnell" and rules[MODEL]["guidance"] is False


def test_a_z_image_model_from_split_gguf_files_generates_and_edits(server):
    # tiny-z-image: ComfyUI's split layout with a Q8_0 GGUF transformer (tests/clients/server.sh).
    c = client(server)
    rules = {m.id: m.model_extra.get("rules") for m in c.models.list()}
    assert rules["tiny-z-image"]["family"] == "Z-Image-Turbo" and rules["tiny-z-image"]["guidance"] is False
    kw = dict(model="tiny-z-image", prompt="a red circle", size="64x64", response_format="b64_json",
              extra_body={"seed": 5, "steps": 2})
    first = c.images.generate(**kw).data[0]
    assert png_size(base64.b64decode(first.b64_json)) == (64, 64)
    assert first.b64_json == c.images.generate(**kw).data[0].b64_json
    edited = c.images.edit(model="tiny-z-image", image=("in.png", base64.b64decode(first.b64_json), "image/png"),
                           prompt="a blue circle", response_format="b64_json",
                           extra_body={"seed": 5, "steps": 4, "strength": 0.5}).data[0]
    assert edited.model_extra["strength"] == 0.5
    assert edited.b64_json != first.b64_json
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(**{**kw, "extra_body": {"guidance_scale": 2.0}})
    assert e.value.param == "guidance_scale"


def test_loras_go_through_extra_body_and_come_back_with_their_hashes(server):
    # tests/clients/server.sh serves tests/data/tiny-loras as the LoRA folder.
    c = client(server)
    model = c.models.retrieve(MODEL)
    assert "pixel-kohya" in [l["name"] for l in model.model_extra["loras"]]
    kw = dict(model=MODEL, prompt="a red circle", size="64x64", response_format="b64_json")
    plain = c.images.generate(**kw, extra_body={"seed": 9, "steps": 2}).data[0]
    styled = c.images.generate(**kw, extra_body={"seed": 9, "steps": 2,
                                                 "loras": [{"name": "pixel-kohya", "scale": 0.8}]}).data[0]
    assert styled.b64_json != plain.b64_json
    [used] = styled.model_extra["loras"]
    assert used["name"] == "pixel-kohya" and used["scale"] == 0.8 and len(used["sha256"]) == 64
    # The same update stored in diffusers' PEFT format draws the same image.
    same = c.images.generate(**kw, extra_body={"seed": 9, "steps": 2, "loras": ["pixel-peft:0.8"]}).data[0]
    pixels = lambda d: idat(base64.b64decode(d.b64_json))
    assert pixels(same) == pixels(styled) and pixels(same) != pixels(plain)
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(**kw, extra_body={"loras": [{"name": "no-such-lora"}]})
    assert e.value.param == "loras" and "pixel-kohya" in e.value.message


def test_bad_key_is_authentication_error(server):
    c = OpenAI(base_url=server["url"] + "/v1", api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError) as e:
        c.images.generate(model=MODEL, prompt="x")
    assert e.value.code == "invalid_api_key"


def test_bad_size_is_bad_request_with_param(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.generate(model=MODEL, prompt="x", size="100x100")
    assert e.value.param == "size"


def test_unknown_model_is_not_found(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server).images.generate(model="no-such-model", prompt="x")
    assert e.value.code == "model_not_found"


def count_429(server):
    with urllib.request.urlopen(server["url"] + "/metrics") as f:
        for line in f.read().decode().splitlines():
            if line.startswith("pictor_requests_total") and 'status="429"' in line and "generations" in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def model_metric(server, name, model=MODEL):
    """A per-model metric of this file's model (the server serves two)."""
    with urllib.request.urlopen(server["url"] + "/metrics") as f:
        for line in f.read().decode().splitlines():
            if line.startswith(name) and f'model="{model}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def queue_depth(server):
    return model_metric(server, "pictor_queue_depth")


def test_sdk_retries_429_until_the_queue_drains(server):
    slow = dict(model=MODEL, prompt="busy", size="256x256", response_format="b64_json",
                extra_body={"steps": 40})
    busy = [threading.Thread(target=lambda: client(server, max_retries=0).images.generate(**slow))
            for _ in range(2)]
    busy[0].start()
    while queue_depth(server) < 1:
        time.sleep(0.05)
    busy[1].start()
    while queue_depth(server) < 2:
        time.sleep(0.05)
    before = count_429(server)
    r = client(server, max_retries=8).images.generate(model=MODEL, prompt="patient", size="64x64",
                                                      response_format="b64_json")
    assert png_size(base64.b64decode(r.data[0].b64_json)) == (64, 64)
    assert count_429(server) > before, "the SDK saw at least one 429 and retried it"
    for t in busy:
        t.join()


def images_generated(server):
    return model_metric(server, "pictor_images_generated_total")


def test_stream_yields_partial_images_then_the_same_final_image(server):
    c = client(server)
    kw = dict(model=MODEL, prompt="a green star", size="64x64", extra_body={"seed": 77, "steps": 4})
    events = list(c.images.generate(stream=True, partial_images=2, **kw))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert png_size(base64.b64decode(e.b64_json)) == (64, 64)
        assert e.size == "64x64" and e.output_format == "png"
    done = events[-1]
    assert done.usage.output_tokens == 16 and done.usage.input_tokens > 0
    plain = c.images.generate(response_format="b64_json", **kw)
    assert done.b64_json == plain.data[0].b64_json, "streaming does not change the image"


def test_a_retry_after_a_dropped_connection_does_not_render_twice(server):
    before = images_generated(server)
    # Each attempt gives up after 0.3 s, long before the job ends; the SDK drops the
    # connection and retries the same body, which attaches to the job already running.
    c = client(server, timeout=0.3, max_retries=6)
    r = c.images.generate(model=MODEL, prompt="slow and steady", size="256x256",
                          response_format="b64_json", extra_body={"steps": 30})
    assert png_size(base64.b64decode(r.data[0].b64_json)) == (256, 256)
    assert images_generated(server) - before == 1, "one image rendered for all attempts"
