#!/usr/bin/env bash
# Issue 8's cost check: scenario 1 (Allocate, REQUIRE_DUAL_STACK, fresh owners, c=64, /16 + /112)
# with and without a node in every request, alternating, 3 runs each, one server process.
#   bash bench/node_cost.sh [NODES]     (default 32 nodes, round-robin over the requests)
set -euo pipefail
cd "$(dirname "$0")/.."
NODES="${1:-32}"
DB="dsipam_nodecost_$$"
ADMIN="${DSIPAM_BENCH_ADMIN_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
URL="${ADMIN%/*}/$DB"
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
psql "$ADMIN" -qc "CREATE DATABASE $DB"
trap 'kill $SERVER 2>/dev/null || true; sleep 1; psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"' EXIT
.venv/bin/dsipam migrate --database-url "$URL" >/dev/null
DSIPAM_INSECURE=1 DSIPAM_LOG_LEVEL=WARNING .venv/bin/dsipam serve --database-url "$URL" --listen "127.0.0.1:$PORT" >/dev/null 2>&1 &
SERVER=$!
sleep 3
run() {  # run POOL NODES
  .venv/bin/dsipam --target "127.0.0.1:$PORT" pool create "$1" --range "10.$2.0.0/16" --range "fd00:$2::/112" >/dev/null
  .venv/bin/python bench/loadgen.py --target "127.0.0.1:$PORT" --call allocate --pool "$1" -c 64 -n 2000 \
    --owner-prefix warm --nodes "$3" >/dev/null
  .venv/bin/python bench/loadgen.py --target "127.0.0.1:$PORT" --call allocate --pool "$1" -c 64 -n 20000 \
    --nodes "$3" 2>&1 | awk '/Requests\/sec/ {print $2}'
}
for i in 1 2 3; do
  plain=$(run "plain$i" "$((i * 2))" 0)
  node=$(run "node$i" "$((i * 2 + 1))" "$NODES")
  echo "run $i: without node ${plain}/s, with node (${NODES} nodes) ${node}/s"
  .venv/bin/dsipam fsck "node$i" --database-url "$URL" | tail -1
done
