"""Cluster mode with real processes: PostgreSQL and SeaweedFS started by scripts/services,
two API nodes and two workers (`pictor serve --role api|worker`) on loopback, driven by the
official `openai` SDK as a client of either node."""

import base64
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from pngs import disc, idat, left_half_mask, size_of

HERE = Path(__file__).resolve().parent
MODEL = "tiny-flux-schnell"


@pytest.fixture(scope="module")
def cluster():
    out = subprocess.run([str(HERE.parent / "cluster.sh"), "2", "2"], check=True,
                         capture_output=True, text=True).stdout
    info = {"apis": [], "workers": []}
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "API":
            info["apis"].append({"url": rest[0], "pid": int(rest[1])})
        elif kind == "WORKER":
            info["workers"].append({"pid": int(rest[0]), "log": rest[1], "url": rest[2]})
        elif kind == "ENV":
            name, _, value = rest[0].partition("=")
            info.setdefault("env", {})[name] = value
        else:
            info[kind.lower()] = rest[0]
    yield info
    for p in info["apis"] + info["workers"]:
        try:
            os.kill(p["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def client(cluster, node=0, **kw):
    return OpenAI(base_url=cluster["apis"][node]["url"] + "/v1", api_key=cluster["key"], **kw)


def sql(cluster, query):
    return subprocess.run(["psql", cluster["database"], "-tAc", query], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_either_api_node_draws_the_same_image_for_a_seed(cluster):
    kw = dict(model=MODEL, prompt="a red circle", size="64x48", response_format="b64_json",
              extra_body={"seed": 42, "steps": 2})
    a = client(cluster, 0).images.generate(**kw).data[0]
    b = client(cluster, 1).images.generate(**kw).data[0]
    assert a.b64_json == b.b64_json
    assert size_of(base64.b64decode(a.b64_json)) == (64, 48)
    assert a.model_dump()["seed"] == 42


def test_url_is_a_presigned_store_link_that_refuses_tampering(cluster):
    r = client(cluster).images.generate(model=MODEL, prompt="a blue square", size="64x64")
    url = r.data[0].url
    assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url) as f:
        assert f.headers["Content-Type"] == "image/png"
        assert size_of(f.read()) == (64, 64)
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(tampered)
    assert e.value.code == 403


def test_previews_and_edits_cross_the_cluster(cluster):
    stream = client(cluster, 1).images.generate(model=MODEL, prompt="a green star", size="64x64",
                                                stream=True, partial_images=2,
                                                extra_body={"steps": 4, "seed": 7})
    kinds = [e.type for e in stream]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    r = client(cluster, 0).images.edit(model=MODEL, image=("in.png", disc(64, 48), "image/png"),
                                       mask=("mask.png", left_half_mask(64, 48), "image/png"),
                                       prompt="a blue disc", response_format="b64_json",
                                       extra_body={"steps": 2})
    assert size_of(base64.b64decode(r.data[0].b64_json)) == (64, 48)
    assert r.data[0].model_dump()["strength"] == 1.0


def test_loras_cross_the_cluster(cluster):
    # The API node checks the name against the LoRA folder; the worker applies the file.
    kw = dict(model=MODEL, prompt="a red circle", size="64x64", response_format="b64_json")
    plain = client(cluster, 0).images.generate(**kw, extra_body={"seed": 9, "steps": 2}).data[0]
    styled = client(cluster, 1).images.generate(
        **kw, extra_body={"seed": 9, "steps": 2, "loras": [{"name": "pixel-kohya", "scale": 0.8}]}
    ).data[0]
    [used] = styled.model_extra["loras"]
    assert used["name"] == "pixel-kohya" and used["scale"] == 0.8 and len(used["sha256"]) == 64
    # The same update in PEFT's naming, through the other node: the same pixels.
    same = client(cluster, 0).images.generate(
        **kw, extra_body={"seed": 9, "steps": 2, "loras": ["pixel-peft:0.8"]}).data[0]
    pixels = lambda d: idat(base64.b64decode(d.b64_json))
    assert pixels(same) == pixels(styled) != pixels(plain)
    with pytest.raises(openai.BadRequestError) as e:
        client(cluster, 1).images.generate(**kw, extra_body={"loras": ["no-such-lora"]})
    assert e.value.param == "loras" and "pixel-kohya" in e.value.message


def stream_events(cluster, body):
    req = urllib.request.Request(cluster["apis"][0]["url"] + "/v1/images/generations",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Bearer " + cluster["key"]})
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read().decode()
    events = []
    for block in text.split("\n\n"):
        name = next((l[6:].strip() for l in block.splitlines() if l.startswith("event:")), None)
        data = "".join(l[5:].strip() for l in block.splitlines() if l.startswith("data:"))
        if name and data:
            events.append((name, json.loads(data)))
    return events


def test_progress_crosses_the_cluster(cluster):
    # With every worker stopped, two jobs queue; a third, streamed with progress, is told
    # that two wait before it (the API node looks its place up in the shared table), then,
    # once the workers go on, each step the worker that runs it publishes.
    workers = [w["pid"] for w in cluster["workers"]]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    threads, result = [], {}
    try:
        for i in range(2):
            t = threading.Thread(target=lambda i=i: client(cluster, 1, timeout=120)
                                 .images.generate(model=MODEL, prompt=f"ahead {i}", size="64x64",
                                                  extra_body={"steps": 2, "seed": i}))
            t.start()
            threads.append(t)
            for _ in range(200):
                if sql(cluster, "SELECT COUNT(*) FROM jobs WHERE state = 'queued'") == str(i + 1):
                    break
                time.sleep(0.02)
        body = {"model": MODEL, "prompt": "a green star", "size": "64x64", "steps": 6,
                "seed": 3, "stream": True, "stream_progress": True}
        streamed = threading.Thread(target=lambda: result.update(
            events=stream_events(cluster, body)))
        streamed.start()
        time.sleep(2.5)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    streamed.join(timeout=120)
    for t in threads:
        t.join(timeout=120)
    events = result["events"]
    progress = [d for n, d in events if n == "pictor.progress"]
    places = [d["queue_position"] for d in progress if d["queue_position"] is not None]
    assert places and places[0] == 2, events
    assert places == sorted(places, reverse=True), "the place only comes closer"
    steps = [(d["step"], d["total"]) for d in progress if d["total"]]
    assert steps and steps[-1] == (6, 6), events
    assert all(d["queue_position"] is None for d in progress if d["total"]), "none while running"
    assert any(n == "image_generation.completed" for n, _ in events)


def test_a_worker_killed_mid_job_loses_nothing(cluster):
    result = {}

    def long_job():
        r = client(cluster, 0, timeout=120).images.generate(
            model=MODEL, prompt="slow and steady", size="256x256", response_format="b64_json",
            extra_body={"steps": 120, "seed": 5})
        result["image"] = r.data[0].b64_json

    t = threading.Thread(target=long_job)
    t.start()
    holder = ""
    for _ in range(100):
        holder = sql(cluster, "SELECT worker FROM jobs WHERE state = 'running' LIMIT 1")
        if holder:
            break
        time.sleep(0.05)
    assert holder, "the job started"
    victim = next(w for w in cluster["workers"] if holder in Path(w["log"]).read_text())
    os.kill(victim["pid"], signal.SIGKILL)
    cluster["workers"].remove(victim)
    t.join(timeout=120)
    assert size_of(base64.b64decode(result["image"])) == (256, 256)
    assert sql(cluster, "SELECT attempts, state FROM jobs ORDER BY created_at DESC LIMIT 1") == "2|done"
    # The survivor reaped the lease and says so; the API nodes count the live workers.
    survivor = cluster["workers"][0]["url"]
    with urllib.request.urlopen(survivor + "/metrics") as f:
        text = f.read().decode()
    assert "pictor_leases_expired_total 1" in text and "pictor_jobs_retried_total 1" in text
    with urllib.request.urlopen(survivor + "/healthz") as f:
        assert f.status == 200
    api = urllib.request.Request(cluster["apis"][1]["url"] + "/metrics",
                                 headers={"Authorization": "Bearer " + cluster["key"]})
    with urllib.request.urlopen(api) as f:
        assert "pictor_workers_alive" in f.read().decode()


def test_a_keys_rate_limit_is_one_budget_across_api_nodes(cluster):
    pictor = os.environ.get("PICTOR_BIN", str(HERE.parents[2] / "target" / "debug" / "pictor"))
    env = {**os.environ, "PICTOR_DATABASE_URL": cluster["database"],
           "PICTOR_DATA_DIR": cluster["dir"] + "/keys"}
    limited = subprocess.run([pictor, "keys", "create", "--name", "limited", "--rpm", "2"],
                             check=True, capture_output=True, text=True, env=env).stdout.strip()
    kw = dict(model=MODEL, prompt="a dot", size="32x32", response_format="b64_json",
              extra_body={"steps": 1})
    nodes = [OpenAI(base_url=a["url"] + "/v1", api_key=limited, max_retries=0)
             for a in cluster["apis"]]
    nodes[0].images.generate(**kw)
    nodes[1].images.generate(**kw)
    with pytest.raises(openai.RateLimitError) as e:
        nodes[0].images.generate(**kw)
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_with_the_store_down_url_answers_503_and_b64_json_still_works(cluster):
    services = str(HERE.parents[2] / "scripts" / "services")
    subprocess.run([services, "down", "s3"], check=True, capture_output=True)
    try:
        c = client(cluster, 1, max_retries=0, timeout=120)
        kw = dict(model=MODEL, prompt="no store", size="32x32", extra_body={"steps": 1})
        r = c.images.generate(response_format="b64_json", **kw)
        assert size_of(base64.b64decode(r.data[0].b64_json)) == (32, 32)
        with pytest.raises(openai.InternalServerError) as e:
            c.images.generate(response_format="url", **kw)
        assert e.value.status_code == 503 and e.value.code == "unavailable"
    finally:
        subprocess.run([services, "up", "s3"], check=True, capture_output=True)
    r = client(cluster, 1).images.generate(model=MODEL, prompt="store back", size="32x32",
                                           extra_body={"steps": 1})
    with urllib.request.urlopen(r.data[0].url) as f:
        assert size_of(f.read()) == (32, 32)


def test_postgresql_restarted_clients_see_503_at_most_then_service_resumes(cluster):
    services = str(HERE.parents[2] / "scripts" / "services")
    kw = dict(model=MODEL, prompt="after the restart", size="32x32", response_format="b64_json",
              extra_body={"steps": 1})
    subprocess.run([services, "down", "postgres"], check=True, capture_output=True)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client(cluster, 1, max_retries=0).images.generate(**kw)
        assert e.value.status_code == 503
    finally:
        subprocess.run([services, "up", "postgres"], check=True, capture_output=True)
    # Both API nodes and the worker reconnect on their own.
    for node in (0, 1):
        r = client(cluster, node, max_retries=3).images.generate(**kw)
        assert size_of(base64.b64decode(r.data[0].b64_json)) == (32, 32)


def test_a_client_that_leaves_cancels_its_job_on_the_worker(cluster):
    # A plain client (not an SDK attempt, which runs detached) gives up after a second.
    body = ('{"model": "%s", "prompt": "abandoned", "size": "256x256", "steps": 200}' % MODEL)
    req = urllib.request.Request(cluster["apis"][1]["url"] + "/v1/images/generations",
                                 body.encode(), {"Authorization": "Bearer " + cluster["key"],
                                                 "Content-Type": "application/json"})
    with pytest.raises(OSError):
        urllib.request.urlopen(req, timeout=1)
    state = ""
    for _ in range(100):
        state = sql(cluster, "SELECT state FROM jobs WHERE request LIKE '%abandoned%'")
        if state == "cancelled":
            break
        time.sleep(0.1)
    assert state == "cancelled"


def test_a_keyed_request_outlives_its_api_node(cluster):
    # Last in this module: it kills API node 0. A long job with an Idempotency-Key starts
    # on node 0, which dies mid-job; the same request to node 1 attaches to that job once
    # node 0 has stopped beating, instead of rendering again.
    kw = dict(model=MODEL, prompt="patient", size="256x256", response_format="b64_json",
              extra_body={"steps": 150, "seed": 9},
              extra_headers={"Idempotency-Key": "outlives-its-node"})
    before = int(sql(cluster, "SELECT COUNT(*) FROM jobs"))

    def first_attempt():
        try:
            client(cluster, 0, max_retries=0).images.generate(**kw)
        except openai.APIError:
            pass

    t = threading.Thread(target=first_attempt)
    t.start()
    for _ in range(200):
        if int(sql(cluster, "SELECT COUNT(*) FROM jobs")) > before:
            break
        time.sleep(0.05)
    os.kill(cluster["apis"][0]["pid"], signal.SIGKILL)
    t.join(timeout=30)
    r = client(cluster, 1, max_retries=0, timeout=180).images.generate(**kw)
    assert size_of(base64.b64decode(r.data[0].b64_json)) == (256, 256)
    assert int(sql(cluster, "SELECT COUNT(*) FROM jobs")) == before + 1, "rendered once"
    again = client(cluster, 1, max_retries=0).images.generate(**kw)
    assert again.data[0].b64_json == r.data[0].b64_json
