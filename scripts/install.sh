#!/usr/bin/env bash
# Installs apex as a home hub on a Debian-like machine with systemd: the binaries in
# /usr/local/bin, the units of deploy/systemd, a system user `apex`, generated keys in
# /etc/apex/{hub,node}.env (mode 0640, root:apex; never on a command line), the hub's and the
# local node's config in /etc/apex/{hub,node}.toml; then starts the hub and a node and prints
# the keys and the dashboard URL.
#
# Usage:
#   scripts/install.sh [--bin-dir DIR]        install (binaries from DIR, default target/release)
#   scripts/install.sh --uninstall            stop and remove binaries, units and /etc/apex; keep the data
#   scripts/install.sh --uninstall --purge    also remove /var/lib/apex-* and the user
#   --root DIR                                act on files under DIR only (no systemctl, no
#                                             useradd; what the tests use)
# Existing keys and configs are kept when run again.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROOT=""
BIN_DIR="target/release"
MODE=install
PURGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --bin-dir) BIN_DIR="${2:?--bin-dir needs a directory}"; shift 2 ;;
        --uninstall) MODE=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
done
if [ "$PURGE" -eq 1 ] && [ "$MODE" != uninstall ]; then
    echo "install.sh: --purge goes with --uninstall" >&2
    exit 64
fi

LIVE=1
[ -n "$ROOT" ] && LIVE=0
if [ "$LIVE" -eq 1 ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo scripts/install.sh)" >&2
    exit 77
fi
UNITS=(apex-hub.service apex-node.service apex-node@.service)
ETC="$ROOT/etc/apex"
UNIT_DIR="$ROOT/etc/systemd/system"
BIN="$ROOT/usr/local/bin"

systemctl_live() { if [ "$LIVE" -eq 1 ]; then systemctl "$@"; fi; }

if [ "$MODE" = uninstall ]; then
    systemctl_live disable --now apex-hub.service apex-node.service 2>/dev/null || true
    for u in "${UNITS[@]}"; do rm -f "$UNIT_DIR/$u"; done
    systemctl_live daemon-reload
    rm -f "$BIN/apex-hub" "$BIN/apex-node"
    rm -rf "$ETC"
    if [ "$PURGE" -eq 1 ]; then
        rm -rf "$ROOT"/var/lib/apex-hub "$ROOT"/var/lib/apex-node "$ROOT"/var/lib/apex-node-*
        if [ "$LIVE" -eq 1 ] && id apex >/dev/null 2>&1; then userdel apex; fi
        echo "apex removed, data and user purged"
    else
        echo "apex removed; the data is kept in /var/lib/apex-hub and /var/lib/apex-node (--purge removes it)"
    fi
    exit 0
fi

for b in apex-hub apex-node; do
    if [ ! -x "$BIN_DIR/$b" ]; then
        echo "install.sh: $BIN_DIR/$b not found: run cargo build --release first (or --bin-dir DIR)" >&2
        exit 66
    fi
done

if [ "$LIVE" -eq 1 ] && ! id apex >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/apex-hub --no-create-home --shell /usr/sbin/nologin apex
fi
install -d -m 0755 "$BIN" "$UNIT_DIR"
install -m 0755 "$BIN_DIR/apex-hub" "$BIN_DIR/apex-node" "$BIN/"
for u in "${UNITS[@]}"; do install -m 0644 "deploy/systemd/$u" "$UNIT_DIR/$u"; done
install -d -m 0750 "$ETC"

key() { printf '%s-%s' "$1" "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"; }
secret_file() { # PATH CONTENT: written once, 0640 root:apex
    local path="$1"
    if [ ! -s "$path" ]; then
        (umask 027; printf '%s\n' "$2" >"$path")
        chmod 0640 "$path"
        if [ "$LIVE" -eq 1 ]; then chgrp apex "$path"; fi
    fi
}
if [ -s "$ETC/hub.env" ]; then
    API_KEY="$(sed -n 's/^APEX_API_KEYS=.*\["\([^"]*\)".*/\1/p' "$ETC/hub.env")"
    NODE_KEY="$(sed -n 's/^APEX_NODE_KEYS=.*\["\([^"]*\)".*/\1/p' "$ETC/hub.env")"
else
    API_KEY="$(key apex)"
    NODE_KEY="$(key node)"
fi
secret_file "$ETC/hub.env" "APEX_API_KEYS='[\"$API_KEY\"]'
APEX_NODE_KEYS='[\"$NODE_KEY\"]'"
secret_file "$ETC/node.env" "APEX_NODE_KEY=$NODE_KEY"
config_file() { # PATH CONTENT: written once, 0644
    if [ ! -s "$1" ]; then printf '%s\n' "$2" >"$1"; chmod 0644 "$1"; fi
}
config_file "$ETC/hub.toml" '# apex hub (scripts/install.sh); keys are in hub.env. See README.md, "Hub configuration".
listen = "0.0.0.0:8088"
data_dir = "/var/lib/apex-hub"
store = "embedded"
# A home hub: stop quickly (no load balancer to wait for).
shutdown_delay_ms = 0
# Advertise the hub on the local network (mDNS, _apex._tcp): companion devices join with
# `apex-node --hub auto` and the node key.
discovery = true'
config_file "$ETC/node.toml" '# apex node on the hub machine (scripts/install.sh); its key is in node.env.
hub = "ws://127.0.0.1:8088"
data_dir = "/var/lib/apex-node"'

"$BIN/apex-hub" --check-config --config "$ETC/hub.toml" >/dev/null
systemctl_live daemon-reload
systemctl_live enable --now apex-hub.service apex-node.service

HOST="$(hostname -I 2>/dev/null | awk '{print $1}')"
echo "apex installed."
echo "  api key:   $API_KEY"
echo "  node key:  $NODE_KEY"
echo "  companion device on this network (the hub advertises itself over mDNS):"
echo "             APEX_NODE_KEY=$NODE_KEY apex-node --hub auto"
echo "             (without multicast between the machines: --hub ws://${HOST:-HOST}:8088)"
echo "  dashboard: http://${HOST:-localhost}:8088/dashboard"
echo "  logs:      journalctl -u apex-hub -u apex-node -f"
