"""Schemathesis against the running server's own `/openapi.json`, with the key: every
check (status codes, content types, response schemas, schema-valid requests accepted and
schema-invalid ones refused), positive and negative cases. The built-in check that
schema-valid requests are accepted is replaced by one that also lets a model's own rules
refuse them, naming the field (`schemathesis_hooks.py` says which). Bounded and seeded, so
the run is quick and repeatable; rerun with more examples (and no seed) when the API
changes."""

import os
import subprocess
from pathlib import Path



def test_the_server_keeps_its_openapi_document(server, tmp_path):
    st = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "schemathesis"
    if not st.exists():
        st = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "schemathesis"
    run = subprocess.run(
        [str(st), "run", server["url"] + "/openapi.json",
         "-H", "Authorization: Bearer " + server["key"],
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--mode", "all", "--max-examples", "40", "--seed", "1",
         "--workers", "1", "--request-timeout", "60", "--no-color"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
             "PYTHONPATH": str(Path(__file__).resolve().parent)})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
