#!/usr/bin/env bash
# Create (or update) the Python virtual environment used by tools/*.py.
#
# The venv lives OUTSIDE the repository:
#   ${PICTOR_TOOLS_VENV:-$HOME/.cache/pictor/venv-tools}
# Running this script again is cheap: pip skips requirements already satisfied.
# Prints the venv path on its last line of output.
#
# `tools/setup-venv.sh zimage` also makes the second venv tools/make_tiny_zimage.py needs,
# ${PICTOR_ZIMAGE_VENV:-$HOME/.cache/pictor/venv-zimage}: its own diffusers and transformers
# (tools/requirements-zimage.txt) in front of the first venv's packages (torch and the rest),
# and prints its path instead.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${PICTOR_TOOLS_VENV:-$HOME/.cache/pictor/venv-tools}"

if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
fi

"$venv/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip >&2
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$here/requirements.txt" >&2

if [ "${1:-}" = "zimage" ]; then
    base="$venv"
    venv="${PICTOR_ZIMAGE_VENV:-$HOME/.cache/pictor/venv-zimage}"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # Appended after the venv's own site-packages: its newer packages win.
    "$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/zz-pictor-tools.pth"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$here/requirements-zimage.txt" >&2
fi

echo "$venv"
