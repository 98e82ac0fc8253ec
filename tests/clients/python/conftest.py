"""Starts one `pictor serve` (via ../server.sh) for the whole session."""

import os
import signal
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def server():
    out = subprocess.run([str(HERE.parent / "server.sh")], check=True, capture_output=True, text=True)
    url, key, pid, data = out.stdout.split()
    yield {"url": url, "key": key, "dir": data}
    os.kill(int(pid), signal.SIGTERM)
