#!/bin/sh
# Builds the release binaries the container image ships, exactly as its Dockerfile does, and
# copies them stripped to OUT_DIR. The Dockerfile runs this script; scripts/test.sh runs it
# too, so the binaries tested here are built with the image's flags.
# Usage: deploy/docker/build-binaries.sh OUT_DIR   (CARGO_TARGET_DIR is honoured)
set -eu
out="${1:?usage: build-binaries.sh OUT_DIR}"
cd "$(dirname "$0")/../.."
cargo build --release --locked -p apex-hub -p apex-node --bins
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$out"
for bin in apex-hub apex-node; do
    cp "$target/release/$bin" "$out/$bin"
    # The release profile keeps line tables for backtraces; the image drops them and the
    # symbols (about 70 MB per binary) to stay small: its backtraces show addresses only.
    strip --strip-all "$out/$bin"
done
