#!/usr/bin/env bash
# The apex main job: builds in release mode, starts a hub and three nodes as separate
# processes, pushes a few thousand real tasks through them, kills one node with SIGKILL
# mid-run, prints a summary, runs the example plugins, a short conversation on the built-in
# mock provider, a memory query, a research session (its agent steps on the nodes) and a
# plan-executor query, and leaves the cluster running until Ctrl-C.
# Extra arguments go to apex-demo (see `target/release/apex-demo --help`), e.g.
#   scripts/demo.sh --tasks 5000 --no-wait
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --workspace
APEX_BIN_DIR="$PWD/target/release" exec target/release/apex-demo --file-root "$PWD" "$@"
