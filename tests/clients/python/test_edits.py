"""Edits and variations as real clients send them: the official `openai` SDK's
`images.edit` and `images.create_variation`, and Open WebUI's exact multipart request,
against a running `pictor serve`."""

import asyncio
import base64
import hashlib
import urllib.request

import aiohttp
import openai
import pytest
from openai import OpenAI

from pngs import disc, left_half_mask, size_of

MODEL = "tiny-flux-schnell"


def client(server):
    return OpenAI(base_url=server["url"] + "/v1", api_key=server["key"])


def test_edit_one_image_answers_a_link_at_the_input_size(server):
    image = disc(96, 64)
    r = client(server).images.edit(model=MODEL, image=("in.png", image, "image/png"),
                                   prompt="a blue disc", extra_body={"steps": 2})
    d = r.data[0].model_dump()
    assert d["input_image_sha256"] == hashlib.sha256(image).hexdigest()
    assert d["strength"] == 0.75
    with urllib.request.urlopen(r.data[0].url) as f:
        assert size_of(f.read()) == (96, 64)


def test_edit_with_a_mask_repaints_from_noise(server):
    r = client(server).images.edit(model=MODEL, image=("in.png", disc(64, 64), "image/png"),
                                   mask=("mask.png", left_half_mask(64, 64), "image/png"),
                                   prompt="a blue disc", n=2, response_format="b64_json",
                                   extra_body={"steps": 2, "seed": 9})
    assert len(r.data) == 2
    assert [d.model_dump()["seed"] for d in r.data] == [9, 10]
    assert r.data[0].model_dump()["strength"] == 1.0
    assert size_of(base64.b64decode(r.data[0].b64_json)) == (64, 64)
    assert r.usage.input_tokens_details.image_tokens == 16


def test_several_images_are_refused_naming_image(server):
    image = ("in.png", disc(64, 64), "image/png")
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.edit(model=MODEL, image=[image, image], prompt="a blue disc")
    assert e.value.param == "image"


def test_a_mask_of_another_size_is_refused_naming_mask(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.edit(model=MODEL, image=("in.png", disc(64, 64), "image/png"),
                                   mask=("mask.png", left_half_mask(32, 64), "image/png"),
                                   prompt="a blue disc")
    assert e.value.param == "mask"


def test_a_streamed_edit_yields_image_edit_events(server):
    stream = client(server).images.edit(model=MODEL, image=("in.png", disc(64, 64), "image/png"),
                                        prompt="a blue disc", stream=True, partial_images=1,
                                        extra_body={"steps": 4, "strength": 1})
    kinds = [event.type for event in stream]
    assert kinds == ["image_edit.partial_image", "image_edit.completed"]


def test_create_variation_without_a_model(server):
    r = client(server).images.create_variation(image=("in.png", disc(64, 64), "image/png"), n=2,
                                               response_format="b64_json", extra_body={"steps": 2})
    assert len(r.data) == 2
    assert r.data[0].b64_json != r.data[1].b64_json
    assert all(size_of(base64.b64decode(d.b64_json)) == (64, 64) for d in r.data)


async def open_webui_edit(server, images):
    """What Open WebUI's `image_edits` sends to an OpenAI engine: form fields as text,
    `image` for one data URL, `image[]` for a list, `response_format=b64_json`."""
    data = {"model": MODEL, "prompt": "make it blue", "n": 1, "size": "64x64",
            "response_format": "b64_json"}
    form = aiohttp.FormData()
    for key, value in data.items():
        form.add_field(key, str(value))
    name = "image" if len(images) == 1 and not isinstance(images, list) else "image[]"
    for i, image in enumerate(images if isinstance(images, list) else [images]):
        form.add_field(name, image, filename=f"{i}.png", content_type="image/png")
    async with aiohttp.ClientSession() as session:
        async with session.post(server["url"] + "/v1/images/edits", data=form,
                                headers={"Authorization": f"Bearer {server['key']}"}) as r:
            return r.status, await r.json(content_type=None)


@pytest.mark.parametrize("as_list", [False, True])
def test_open_webui_edit_request(server, as_list):
    image = disc(64, 64)
    status, body = asyncio.run(open_webui_edit(server, [image] if as_list else image))
    assert status == 200, body
    assert size_of(base64.b64decode(body["data"][0]["b64_json"])) == (64, 64)
