#!/usr/bin/env bash
# Create (or update) the Python virtual environment used by tools/*.py.
#
# The venv lives OUTSIDE the repository:
#   ${PICTOR_TOOLS_VENV:-$HOME/.cache/pictor/venv-tools}
# Running this script again is cheap: pip skips requirements already satisfied.
# Prints the venv path on its last line of output.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${PICTOR_TOOLS_VENV:-$HOME/.cache/pictor/venv-tools}"

if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
fi

"$venv/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip >&2
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$here/requirements.txt" >&2

echo "$venv"
