#!/bin/sh
# disk_free: a synchronous apex plugin in POSIX sh (VCP plugin-manifest.json format).
# It takes no arguments (stdin is read and ignored) and prints one JSON answer on stdout.
cat > /dev/null
df -Pk . | awk 'NR == 2 {
  printf "{\"status\":\"success\",\"result\":{\"filesystem\":\"%s\",\"total_kb\":%d,\"used_kb\":%d,\"available_kb\":%d,\"use_percent\":%d}}\n", $1, $2, $3, $4, $5
}'
