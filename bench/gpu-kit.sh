#!/usr/bin/env bash
# Prepares, on this machine (no GPU needed), what bench/gpu.sh needs on a GPU machine that
# has an NVIDIA driver, Python and PyTorch, but no Rust toolchain and no network:
#
#   target/gpu-kit/pictor.xz        pictor for one compute capability (scripts/build-cuda)
#   target/gpu-kit/lib/             libcudart.so.13 (cuBLAS comes from the machine's PyTorch)
#   target/gpu-kit/wheels/          diffusers, transformers and what they import, for one
#                                   Python version
#
#   bench/gpu-kit.sh [CAP] [PYTHON]   # default 90 (H100, H200) and 3.12
#
# The kit stays under the 64 MiB a device call may carry; carry `target/gpu-kit` and run
# `bash bench/gpu.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
cap=${1:-90}
python=${2:-3.12}
kit=target/gpu-kit
venv=${PICTOR_TOOLS_VENV:-$HOME/.cache/pictor/venv-tools}

scripts/build-cuda "$cap"
rm -rf "$kit" && mkdir -p "$kit/lib" "$kit/wheels"
objcopy --strip-all "target/cuda/dist/pictor-sm$cap" "$kit/pictor"
xz -T0 -9e "$kit/pictor"
cp target/cuda/dist/lib/libcudart.so.13 "$kit/lib/"
echo "$cap" > "$kit/cap"

[ -x "$venv/bin/pip" ] || bash tools/setup-venv.sh > /dev/null
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
# The versions the fixtures were made with (tools/requirements.txt), and what they import
# that a PyTorch installation may lack.
"$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    "${platforms[@]}" --python-version "$python" -d "$kit/wheels" \
    diffusers==0.35.2 transformers==4.57.6 tokenizers==0.22.1 safetensors==0.6.2 \
    huggingface-hub==0.36.0 regex pyyaml pillow requests urllib3 idna certifi \
    charset-normalizer tqdm importlib-metadata zipp
echo "$python" > "$kit/python"

size=$(du -sb "$kit" | cut -f1)
echo "gpu-kit: $kit, $((size / 1048576)) MiB (sm_$cap, Python $python)"
[ "$size" -le $((64 * 1048576)) ] || { echo "gpu-kit: over the 64 MiB a device call carries" >&2; exit 1; }
