#!/usr/bin/env bash
# Build stable-diffusion.cpp's `sd` CLI as a benchmark-only peer for `sd35 bench --device cpu --peers`.
#
# stable-diffusion.cpp (https://github.com/leejet/stable-diffusion.cpp) and its vendored ggml are MIT-licensed
# (Copyright (c) 2023 leejet; ggml Copyright (c) 2023-2024 The ggml authors). We do not ship or link it: this
# script builds it from the stable-diffusion-cpp-python sdist (also MIT), which vendors a pinned sd.cpp + ggml,
# into a folder OUTSIDE the repository, and our benchmark only runs the resulting binary. Not a CI dependency.
#
# Usage: benchmarks/build_sdcpp.sh            # builds into $SDCPP_HOME (default /work/sdcpp)
#        SDCPP_JOBS=4 benchmarks/build_sdcpp.sh
# Result: $SDCPP_HOME/build/bin/sd-cli   (found there by `sd35 bench --peers`, or pass --sdcpp PATH)
#
# Why these flags: Release + GGML_NATIVE=ON so ggml compiles for this CPU (-march=native: AVX-512 and
# AVX512_BF16 where present), examples ON to get the `sd-cli` CLI, WebP/WebM OFF (PNG output is enough and the
# sdist may lack those submodules). `nice -n 10` and -j2 by default: the build machine is shared.
set -euo pipefail

SDIST_VERSION="${SDCPP_PY_VERSION:-0.4.7}"
SDCPP_HOME="${SDCPP_HOME:-/work/sdcpp}"
JOBS="${SDCPP_JOBS:-2}"
PIP="${PIP:-pip}"

mkdir -p "$SDCPP_HOME"
cd "$SDCPP_HOME"

tarball="stable_diffusion_cpp_python-${SDIST_VERSION}.tar.gz"
if [ ! -f "$tarball" ]; then
    "$PIP" download "stable-diffusion-cpp-python==${SDIST_VERSION}" --no-deps --no-binary :all: -d "$SDCPP_HOME"
fi
src="$SDCPP_HOME/stable_diffusion_cpp_python-${SDIST_VERSION}/vendor/stable-diffusion.cpp"
if [ ! -d "$src" ]; then
    tar xzf "$tarball"
fi

# One-line patch, on by default (SDCPP_PATCH_DEPTH=0 builds it untouched): sd.cpp's MMDiT starts its depth at
# 24 and only *raises* it from the joint_blocks.N keys (src/mmdit.hpp, MMDiT::MMDiT), so any depth below SD3.5
# Medium's is refused ("context_embedder.bias has wrong shape"). Starting at 0 makes the depth the one the
# weights have, which lets the scaled comparison config (depth 8, hidden 512) load; for depth >= 24 (every real
# SD3 checkpoint) nothing changes, and no kernel or graph is touched.
if [ "${SDCPP_PATCH_DEPTH:-1}" = "1" ]; then
    sed -i 's/int64_t depth                    = 24;/int64_t depth                    = 0;  \/\/ sd35 bench: depth from the keys/' \
        "$src/src/mmdit.hpp"
    grep -q "sd35 bench: depth from the keys" "$src/src/mmdit.hpp" \
        || { echo "build_sdcpp.sh: the depth patch did not apply (sd.cpp's mmdit.hpp changed?)" >&2; exit 1; }
fi

nice -n 10 cmake -S "$src" -B "$SDCPP_HOME/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DSD_BUILD_EXAMPLES=ON \
    -DGGML_NATIVE=ON \
    -DSD_WEBP=OFF -DSD_WEBM=OFF
nice -n 10 cmake --build "$SDCPP_HOME/build" --config Release --target sd-cli -j "$JOBS" \
    || nice -n 10 cmake --build "$SDCPP_HOME/build" --config Release -j "$JOBS"

# The sdist has no .git, so sd.cpp's own version string reads "unknown": record where it came from instead.
patched=""
grep -q "sd35 bench: depth from the keys" "$src/src/mmdit.hpp" && patched=", MMDiT depth patch"
ggml_version=$(sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$src/ggml/CMakeLists.txt" | paste -sd.)
echo "stable-diffusion-cpp-python==${SDIST_VERSION} (vendored stable-diffusion.cpp + ggml ${ggml_version}${patched})" \
    > "$SDCPP_HOME/build/SOURCE"
ls -la "$SDCPP_HOME/build/bin/"
