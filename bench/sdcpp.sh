#!/usr/bin/env bash
# Builds stable-diffusion.cpp's `sd-cli` for this machine's CPU (ggml with -march=native:
# AVX2, or AVX-512 with VNNI and BF16 where the CPU has them), from git snapshots of its
# repository and of ggml, for bench/cpu_vs_sdcpp.sh.
#
#   bench/sdcpp.sh SD_GIT_DIR GGML_GIT_DIR
#
# SD_GIT_DIR is a bare or normal git directory of leejet/stable-diffusion.cpp, GGML_GIT_DIR
# one of ggml-org/ggml holding the commit stable-diffusion.cpp pins as its `ggml`
# submodule. The build goes to ${PICTOR_SDCPP_CACHE:-~/.cache/pictor/sdcpp}: bin/sd-cli,
# and VERSION with both commits. WebP, WebM and the server's web front end are left out
# (they are submodules the snapshot lacks; the CLI writes PNG without them).
set -euo pipefail
[ $# -eq 2 ] || { sed -n '2,13p' "$0"; exit 2; }
sd_git=$1
ggml_git=$2
cache=${PICTOR_SDCPP_CACHE:-$HOME/.cache/pictor/sdcpp}
src=$cache/src

command -v cmake > /dev/null || { apt-get update -qq && apt-get install -y -qq cmake > /dev/null; }
sd_commit=$(git --git-dir="$sd_git" rev-parse HEAD)
ggml_commit=$(git --git-dir="$sd_git" ls-tree HEAD ggml | awk '{print $3}')
git --git-dir="$ggml_git" cat-file -e "$ggml_commit^{commit}" \
    || { echo "sdcpp.sh: $ggml_git lacks ggml commit $ggml_commit" >&2; exit 1; }

version="sd $sd_commit ggml $ggml_commit"
if [ "$(cat "$src/.version" 2> /dev/null)" != "$version" ]; then
    rm -rf "$src" && mkdir -p "$src/ggml"
    # Every file the snapshot holds: a snapshot may lack some large ones (sample images
    # and videos), which the build does not need.
    extract() { # git-dir commit dest
        git --git-dir="$1" ls-tree -r "$2" | while read -r mode type sha path; do
            [ "$type" = blob ] || continue
            mkdir -p "$3/$(dirname "$path")"
            if ! git --git-dir="$1" cat-file blob "$sha" > "$3/$path" 2> /dev/null; then
                rm -f "$3/$path"
            elif [ "$mode" = 100755 ]; then
                chmod +x "$3/$path"
            fi
        done
    }
    extract "$sd_git" "$sd_commit" "$src"
    extract "$ggml_git" "$ggml_commit" "$src/ggml"
    echo "$version" > "$src/.version"
fi
# A snapshot lacks the tokenizer vocabularies compiled into sd.cpp (large generated
# headers). T5's is made from the tokenizer.json Pictor embeds (FLUX.1's, which Pictor's
# T5 reads too), its Metaspace pre-tokenizer also spelt the older way sd.cpp reads
# (`add_prefix_space`); those of models not benchmarked here are left empty.
python3 - "$src/src/tokenizers/vocab" "$(pwd)/crates/pictor-engine/assets/flux-tokenizers/tokenizer_2/tokenizer.json" <<'EOF'
import json, os, re, sys
vocab, t5_json = sys.argv[1], sys.argv[2]
cpp = open(os.path.join(vocab, "vocab.cpp")).read()
symbols = re.findall(r"reinterpret_cast<const char\*>\(([a-z0-9_]+_str)\)", cpp)
for header in re.findall(r'#include "([a-z0-9_]+\.hpp)"', cpp):
    path = os.path.join(vocab, header)
    if os.path.exists(path) and not os.path.exists(path + ".made"):
        continue
    stem = header[: -len(".hpp")].replace("_merges", "").replace("_vocab", "")
    owned = [s for s in symbols if s.startswith(stem.replace("qwen", "qwen2") + "_") or s.startswith(stem + "_")]
    if header.startswith("gemma_"):
        owned = [s for s in owned if not s.startswith("gemma2")]
    if "merges" in header:
        owned = [s for s in owned if "merges" in s]
    elif "vocab" in header:
        owned = [s for s in owned if "vocab" in s]
    data = b"\0"
    if header == "t5.hpp":
        tokenizer = json.load(open(t5_json))
        pre = tokenizer["pre_tokenizer"]
        pre.setdefault("add_prefix_space", pre.get("prepend_scheme", "always") != "never")
        data = json.dumps(tokenizer, ensure_ascii=False).encode()
    text = "".join(f"static const unsigned char {sym}[] = {{{','.join(map(hex, data))}}};\n" for sym in owned)
    if not os.path.exists(path) or open(path).read() != text:
        open(path, "w").write(text)
        open(path + ".made", "w").write("")
        print(f"made {header}: {', '.join(owned)} ({len(data)} bytes)")
EOF
if [ ! -x "$cache/bin/sd-cli" ] || [ "$(cat "$cache/VERSION" 2> /dev/null)" != "$version" ] || [ -n "$(find "$src" -newer "$cache/bin/sd-cli" -name '*.hpp' -print -quit)" ]; then
    cmake -S "$src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DSD_WEBP=OFF -DSD_WEBM=OFF -DSD_SERVER_BUILD_FRONTEND=OFF > "$cache/cmake.log" 2>&1
    cmake --build "$cache/build" -j"$(nproc)" --target sd-cli > "$cache/build.log" 2>&1
    mkdir -p "$cache/bin"
    cp "$cache/build/bin/sd-cli" "$cache/bin/sd-cli"
    echo "$version" > "$cache/VERSION"
fi
echo "sd-cli: $cache/bin/sd-cli ($(cat "$cache/VERSION"))"
