#!/usr/bin/env bash
# Benchmarks the cluster on this machine (release build): no-op throughput, latency at half
# load, SIGKILL/SIGSTOP detection and re-dispatch times. Prints a table.
# Usage: scripts/bench.sh [SUITE] [apex-bench flags]   (SUITE: core, the default, store, llm or
#   limits: the rate limiter's cost per check in process and on Redis, and the gateway's
#   latency with limits off and on; plugins: 10,000 stdio plugin runs, 10 % killed at their
#   timeout, and the processes, zombies and fds left behind; or tool-hop: the hub → node → hub
#   hop of one server-side tool call of a chat completion, excluding model time; chat: a
#   session's storage; memory: the memory index's cost on a turn's hot path, and query
#   p50/p99 over 100,000 stored messages; research: the research engine's own time per DAG
#   node over a 1,000- then a 10,000-task plan of agent.run steps against a fake upstream,
#   `--research-tasks N` for one size only, `--research-nodes K` (default 4))
#   scripts/bench.sh core --tasks 50000 --nodes 3
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

suite="core"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    suite="$1"
    shift
fi

# Honours CARGO_TARGET_DIR (e.g. a separate release target dir beside a debug one).
target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --workspace
APEX_BIN_DIR="$target/release" exec "$target/release/apex-bench" "$suite" "$@"
