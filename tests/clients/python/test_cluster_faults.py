"""Faults under load, with real processes: 100 requests, each with its own
Idempotency-Key, from 8 clients against 2 API nodes and 3 workers, while 3 workers are
killed with SIGKILL (each replaced) and one API node is killed and restarted. Every
accepted request is answered with its image, and no request is rendered as two jobs."""

import base64
import os
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from openai import OpenAI

from pngs import size_of
from test_cluster import HERE, MODEL, cluster as _cluster  # noqa: F401 (the fixture)

PICTOR = os.environ.get("PICTOR_BIN", str(HERE.parents[2] / "target" / "debug" / "pictor"))
REQUESTS = 100


def start(cluster, role, name, listen):
    env = {**os.environ, **cluster["env"], "PICTOR_DATA_DIR": f"{cluster['dir']}/{name}"}
    log = open(f"{cluster['dir']}/{name}.log", "w")
    return subprocess.Popen([PICTOR, "--config", f"{cluster['dir']}/pictor.toml", "serve",
                             "--role", role, "--listen", listen], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_ready(url):
    for _ in range(300):
        try:
            with urllib_open(url + "/readyz"):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come back")


def urllib_open(url):
    import urllib.request
    return urllib.request.urlopen(url, timeout=2)


def test_nothing_accepted_is_lost_and_nothing_is_rendered_twice(_cluster):
    cluster = _cluster
    rng = random.Random(7)
    workers = [w["pid"] for w in cluster["workers"]]
    extra = []
    # A third worker, so that two remain while one is being replaced.
    extra.append(start(cluster, "worker", "worker3", "127.0.0.1:0"))
    workers.append(extra[-1].pid)
    time.sleep(1.0)
    before = int(subprocess.run(["psql", cluster["database"], "-tAc", "SELECT COUNT(*) FROM jobs"],
                                check=True, capture_output=True, text=True).stdout)
    done = []
    failures = []
    progress = threading.Event()

    def one(i):
        key = f"soak-{i}"
        for attempt in range(6):
            # A client that cannot reach one node retries on the other with the same key.
            node = cluster["apis"][(i + attempt) % 2]["url"]
            c = OpenAI(base_url=node + "/v1", api_key=cluster["key"], max_retries=2, timeout=120)
            try:
                r = c.images.generate(model=MODEL, prompt=f"soak {i}", size="64x64",
                                      response_format="b64_json",
                                      extra_body={"steps": 24, "seed": i},
                                      extra_headers={"Idempotency-Key": key})
                assert size_of(base64.b64decode(r.data[0].b64_json)) == (64, 64)
                done.append(i)
                if len(done) % 10 == 0:
                    progress.set()
                return
            except (openai.APIConnectionError, openai.InternalServerError, openai.APIStatusError):
                time.sleep(0.5)
        failures.append(i)

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(one, i) for i in range(REQUESTS)]
        # Three worker kills, each replaced, and one API node killed and restarted.
        for n, at in enumerate((15, 35, 55)):
            while len(done) < at:
                time.sleep(0.05)
            victim = rng.choice(workers)
            os.kill(victim, signal.SIGKILL)
            workers.remove(victim)
            extra.append(start(cluster, "worker", f"worker-new{n}", "127.0.0.1:0"))
            workers.append(extra[-1].pid)
            if n == 1:
                api = cluster["apis"][0]
                os.kill(api["pid"], signal.SIGKILL)
                restarted = start(cluster, "api", "api1-again", api["url"].removeprefix("http://"))
                extra.append(restarted)
                api["pid"] = restarted.pid
        for f in futures:
            f.result()
    try:
        assert failures == [], f"requests never answered: {failures}"
        assert sorted(done) == list(range(REQUESTS))
        jobs = int(subprocess.run(["psql", cluster["database"], "-tAc",
                                   "SELECT COUNT(*) FROM jobs"],
                                  check=True, capture_output=True, text=True).stdout)
        assert jobs - before == REQUESTS, "one job per request, whatever failed"
        # Every worker stopped (SIGTERM: they retire at once): a request is told so now,
        # not at its deadline.
        for pid in workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in extra:
            if p.pid in workers:
                p.wait(timeout=30)
        # The workers killed with SIGKILL above stay advertised until their last heartbeat
        # is 10 s old, and an API node trusts a lookup that found one for 2 s: wait for
        # both, so that what is probed is a cluster with no live worker.
        deadline = time.time() + 20
        while time.time() < deadline:
            live = int(subprocess.run(
                ["psql", cluster["database"], "-tAc",
                 "SELECT COUNT(*) FROM workers WHERE seen_at > "
                 "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT - 10000"],
                check=True, capture_output=True, text=True).stdout)
            if live == 0:
                break
            time.sleep(0.2)
        time.sleep(2.5)
        c = OpenAI(base_url=cluster["apis"][1]["url"] + "/v1", api_key=cluster["key"],
                   max_retries=0, timeout=30)
        started = time.time()
        try:
            c.images.generate(model=MODEL, prompt="anyone?", size="32x32",
                              extra_body={"steps": 1})
            raise AssertionError("served with no worker")
        except openai.InternalServerError as e:
            assert e.status_code == 503 and "No live worker" in e.message, e.message
        assert time.time() - started < 5
    finally:
        for p in extra:
            p.kill()
