#!/usr/bin/env bash
# The GPU benchmark, run on a machine with an NVIDIA driver, Python and PyTorch but no Rust
# toolchain and no network, from the repository root with target/gpu-kit beside it (made
# here by bench/gpu-kit.sh). What it measures: bench/gpu_bench.py. About 5 minutes on an
# H100 (most of it writing and loading 34 GB of random weights); every figure goes to
# $OUT/gpu-bench.json, the log to $OUT/gpu-bench.log.
#
#   bash bench/gpu.sh                      # on the GPU machine
#   PICTOR_GPU_BENCH_DRY=1 bash bench/gpu.sh   # here: the same steps on the CPU, toy-sized,
#                                          # with target/release/pictor and the tools venv
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/pictor-gpu-bench}
work=${PICTOR_GPU_BENCH_WORK:-/tmp/pictor-gpu-bench-work}
dry=${PICTOR_GPU_BENCH_DRY:-}
kit=target/gpu-kit
mkdir -p "$out" "$work/lib"
exec > >(tee -a "$out/gpu-bench.log") 2>&1
say() { printf 'gpu.sh: %s\n' "$*"; }

if [ -n "$dry" ]; then
    python=${PYTHON:-$HOME/.cache/pictor/venv-tools/bin/python}
    pictor=target/release/pictor
    [ -x "$pictor" ] || cargo build --release -p pictor
    exec "$python" bench/gpu_bench.py --dry --pictor "$pictor" --work "$work" --out "$out/gpu-bench.json"
fi

python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || say "no nvidia-smi"

# 1. The binary, with the CUDA runtime beside it ($ORIGIN/lib).
[ -f "$kit/pictor.xz" ] || { say "no $kit: make it with bench/gpu-kit.sh and carry it"; exit 1; }
xz -dc "$kit/pictor.xz" > "$work/pictor" && chmod +x "$work/pictor"
cp "$kit"/lib/* "$work/lib/"

# 2. cuBLAS and cuRAND: PyTorch's own wheels (nvidia-cublas etc.), when they are CUDA 13's.
libs=$("$python" - <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = set()
for r in roots:
    for f in glob.glob(os.path.join(r, "nvidia", "**", "lib*.so*"), recursive=True) + \
             glob.glob(os.path.join(r, "torch", "lib", "lib*.so*")):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
found=$(printf '%s' "$libs" | tr ':' '\n' | while read -r d; do ls "$d" 2>/dev/null; done | grep -E '^lib(cublas|cublasLt|curand)\.so' | sort -u | tr '\n' ' ')
say "CUDA libraries from PyTorch: ${found:-none}"
case "$found" in
    *libcublas.so.13*) ;;
    *) say "no libcublas.so.13 there (PyTorch built for another CUDA): Pictor will try the cuBLAS it finds, untested";;
esac

# 3. diffusers and transformers from the kit's wheels (the versions the fixtures were made
#    with), unpacked onto PYTHONPATH in front of PyTorch's own packages (no pip or venv
#    needed); what they import comes from the kit only where the machine lacks it.
mkdir -p "$work/site"
"$python" - "$kit/wheels" "$work/site" <<'EOF'
import glob, importlib.metadata as md, os, sys, zipfile
core = {"diffusers", "transformers", "tokenizers", "safetensors", "huggingface_hub"}
for wheel in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    name = os.path.basename(wheel).split("-")[0].lower()
    if name not in core:
        try:
            md.version(name)
            continue  # the machine's own
        except md.PackageNotFoundError:
            pass
    zipfile.ZipFile(wheel).extractall(sys.argv[2])
    print("gpu.sh: from the kit:", os.path.basename(wheel))
EOF
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c 'import diffusers, transformers, torch; print("diffusers", diffusers.__version__, "torch", torch.__version__, "cuda", torch.version.cuda)' \
    || say "diffusers does not import: its figures will be missing"

# 4. The benchmark.
"$python" bench/gpu_bench.py --pictor "$work/pictor" --work "$work" --out "$out/gpu-bench.json"
status=$?
say "figures: $out/gpu-bench.json (exit $status)"
exit $status
