#!/bin/sh
# Builds the release binaries the container image ships, exactly as its Dockerfile does, and
# copies them stripped to OUT_DIR. The Dockerfile runs this script; scripts/test.sh runs it
# too, so the binaries tested here are built with the image's flags.
# Usage: deploy/docker/build-binaries.sh OUT_DIR   (CARGO_TARGET_DIR is honoured)
set -eu
out="${1:?usage: build-binaries.sh OUT_DIR}"
cd "$(dirname "$0")/../.."
cargo build --profile image --locked -p apex-hub -p apex-node --bins
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$out"
for bin in apex-hub apex-node; do
    cp "$target/image/$bin" "$out/$bin"
    # The image profile (Cargo.toml) drops line tables; strip removes the symbols too, so
    # the image stays small: its backtraces show addresses only.
    strip --strip-all "$out/$bin"
done
