#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a
# figure that, unlike CPU time on a shared machine, repeats to within a few
# hundred instructions, so that small costs (an idle layer) can be told
# from noise. Kernel work (the sockets) is not counted: compare configs
# with each other, not with other proxies.
#
# One weft-proxy --concurrency 1 under valgrind, an nginx upstream serving
# a 2-byte response; wrk -c8 (h1) or h2load -c2 -m4 (h2) warms up for 2 s,
# then the counters are zeroed, the load runs for SECONDS, and the count is
# divided by the requests the generator completed.
#
# Needs: a release build (cargo build --release -p weft-proxy), valgrind,
# nginx, wrk, h2load.
#
# Usage: benches/scripts/instructions-per-request.sh CONFIG h1|h2 [SECONDS]
# WEFT_BIN=PATH counts another build (default: target/release/weft-proxy).
# With CALLGRIND_OUT=FILE the measured window's profile is kept there, for
# callgrind_annotate (e.g. --inclusive=yes) to say where the instructions go.
# CONFIG uses @PORT@, @UPSTREAM@ and @COLLECTOR@ as wrk-compare.sh's
# WEFT_CONFIGS do (the OTLP receiver, `weft-bench otlp-receiver`, runs
# outside valgrind and is not counted). WRK_SCRIPT=FILE gives wrk a Lua
# script, as in wrk-compare.sh.
set -euo pipefail
cfg=$1 mode=$2 seconds=${3:-5}
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
up_port=$((20000 + RANDOM % 5000)) port=$((up_port + 5000))
# Each kill may fail (a proxy that crashed is gone already); under `set -e`
# a failed one would end the cleanup and leave the others running.
cleanup() {
  [ -n "${vpid:-}" ] && kill "$vpid" 2>/dev/null || true
  [ -n "${otlp_pid:-}" ] && kill "$otlp_pid" 2>/dev/null || true
  [ -f "$work/up.pid" ] && kill "$(cat "$work/up.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cat > "$work/up.conf" <<NGINX
worker_processes 1; daemon off; pid $work/up.pid; error_log $work/up.err warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$up_port; location / { return 200 "ok"; } } }
NGINX
nginx -c "$work/up.conf" &
otlp_port=$((up_port + 1))
if [ -x "$root/target/release/weft-bench" ]; then
  "$root/target/release/weft-bench" otlp-receiver --grpc 127.0.0.1:$otlp_port --http 127.0.0.1:0 \
    >/dev/null 2>"$work/otlp.log" &
  otlp_pid=$!
fi
sed -e "s/@PORT@/$port/g" -e "s/@UPSTREAM@/127.0.0.1:$up_port/g" \
  -e "s|@COLLECTOR@|http://127.0.0.1:$otlp_port|g" "$cfg" > "$work/proxy.yaml"
valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
  "${WEFT_BIN:-$root/target/release/weft-proxy}" --config "$work/proxy.yaml" --concurrency 1 --log-level warn \
  > "$work/proxy.log" 2>&1 &
vpid=$!
for _ in $(seq 150); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.2; done
load() {
  if [ "$mode" = h1 ]; then
    wrk -t1 -c8 -d"$1s" ${WRK_SCRIPT:+-s "$WRK_SCRIPT"} "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}'
  else
    h2load -c2 -m4 -D"$1" "http://127.0.0.1:$port/" | awk '/^requests:/ {print $8}'
  fi
}
load 2 >/dev/null
callgrind_control -z "$vpid" >/dev/null
requests=$(load "$seconds")
callgrind_control -d "$vpid" >/dev/null
sleep 0.5
profile=$(ls -t "$work"/cg.out* | head -1)
instructions=$(awk '/^(summary|totals):/ {print $2; exit}' "$profile")
[ -n "${CALLGRIND_OUT:-}" ] && cp "$profile" "$CALLGRIND_OUT"
awk -v c="$(basename "$cfg")" -v m="$mode" -v n="$requests" -v ir="$instructions" \
  'BEGIN { printf "%s %s requests=%d instructions_per_request=%.0f\n", c, m, n, ir / n }'
