#!/usr/bin/env bash
# CPU per request through weft-proxy, nginx and HAProxy, measured with the
# load generators users trust: wrk (HTTP/1.1 keep-alive) and h2load (h2c).
#
# Each proxy runs one worker pinned to CPU 0; the load generator and the
# upstream (an nginx serving a fixed 2-byte response over keep-alive, so
# that the upstream costs as little as possible) share CPU 1. Targets are
# interleaved within each round; the summary gives each figure's median over
# the rounds (and the proxy core's busy range), then each target's ratios
# to the first of TARGETS: the medians of the rounds' own ratios.
# For each figure it says whether the proxy's core saturated (its CPU time
# over the wall time): a figure taken with the proxy's core idle half the
# time measures the generator, not the proxy. HTTP/1.1 rows also give
# wrk's 99th-percentile latency (`p99_us`; each figure's median on its
# own); h2load reports no percentiles.
#
# Needs: a release build (cargo build --release -p weft-proxy), wrk, h2load,
# nginx, haproxy (apt-get install -y wrk nghttp2-client nginx-light haproxy),
# taskset. WEFT_BINS="before=/path/to/weft-proxy ..." adds other weft builds
# (each NAME=PATH becomes a target `weft-NAME`) to compare before and after a
# change in the same run. WEFT_CONFIGS="plain=FILE resilience=FILE" adds
# weft-proxy runs from configuration files (target `weft-NAME` each), in
# which `@PORT@` and `@UPSTREAM@` stand for the listener's port and the
# upstream's address: benches/scripts/weft-plain.yaml and
# weft-resilience.yaml measure what idle resilience layers cost. `@COLLECTOR@`
# stands for an OTLP/gRPC receiver (`weft-bench otlp-receiver`, started on
# CPU 1 with the upstream): weft-trace-1.yaml and weft-trace-100.yaml
# measure what tracing costs. `NAME=FILE@PATH` runs FILE with the weft-proxy
# at PATH (another build) instead of this tree's.
#
# RATE=N adds a mode `rate` to each round: HTTP/1.1 at a fixed N requests per
# second (open loop, CONNECTIONS connections) from `weft-bench load --rate`,
# pinned to CPU 1, whose p99 counts each request from its intended send time
# (coordinated omission corrected); choose N so that the proxy's core is
# about half busy, where latency, not queueing behind a saturated core, is
# what differs. Its rows say whether the generator kept to its schedule.
#
# MODES="rate" (any of h1, h2, rate) runs only those modes: more rounds of
# the one that spreads most, in the same time.
#
# WRK_SCRIPT=FILE gives wrk a Lua script (`wrk -s`) for its requests:
# benches/scripts/distinct-paths.lua sends a path never sent before each
# time, which no decision cache answers.
#
# Usage: benches/scripts/wrk-compare.sh [ROUNDS] [SECONDS] [CONNECTIONS]
set -euo pipefail
rounds=${1:-3}; seconds=${2:-5}; conns=${3:-32}
modes=${MODES:-"h1 h2${RATE:+ rate}"}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/target/release
work=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  # A server may remove its pid file as it exits (nginx does), between the
  # test and the read.
  for pid in "$work"/*.pid; do [ -f "$pid" ] && kill "$(cat "$pid" 2>/dev/null)" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
up_port=19281 weft_port=19280 base_port=19284 nginx_port=19282 haproxy_port=19283
otlp_port=19279

cat > "$work/upstream.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/upstream.pid;
error_log $work/upstream.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$up_port;
    location / { return 200 "ok"; }
  }
}
NGINX

cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$up_port; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_port;
    # nginx 1.22 speaks h2c (prior knowledge) only on a port of its own.
    listen 127.0.0.1:$((nginx_port + 100)) http2;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
cat > "$work/haproxy.cfg" <<HAPROXY
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  # HTTP/1.1 and h2c (prior knowledge) on one port, as weft.
  bind 127.0.0.1:$haproxy_port
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:$up_port
HAPROXY

taskset -c 1 nginx -c "$work/upstream.conf" >/dev/null 2>&1 &
if [ -x "$bin/weft-bench" ]; then
  taskset -c 1 "$bin/weft-bench" otlp-receiver --grpc 127.0.0.1:$otlp_port --http 127.0.0.1:0 \
    >/dev/null 2>"$work/otlp.log" &
fi
taskset -c 0 "$bin/weft-proxy" --listen 127.0.0.1:$weft_port --upstream 127.0.0.1:$up_port \
  --concurrency 1 --log-level warn >/dev/null 2>&1 &
weft_pid=$!
declare -A extra_pid extra_port
extra_targets=
next_port=$base_port
for spec in ${WEFT_BINS:-}; do
  name=weft-${spec%%=*}
  next_port=$((next_port + 1))
  taskset -c 0 "${spec#*=}" --listen 127.0.0.1:$next_port --upstream 127.0.0.1:$up_port \
    --concurrency 1 --log-level warn >/dev/null 2>&1 &
  extra_pid[$name]=$! extra_port[$name]=$next_port
  extra_targets="$extra_targets $name"
done
for spec in ${WEFT_CONFIGS:-}; do
  name=weft-${spec%%=*}
  file=${spec#*=} exe=$bin/weft-proxy
  case $file in *@*) exe=${file#*@} file=${file%%@*} ;; esac
  next_port=$((next_port + 1))
  sed -e "s/@PORT@/$next_port/g" -e "s/@UPSTREAM@/127.0.0.1:$up_port/g" \
    -e "s|@COLLECTOR@|http://127.0.0.1:$otlp_port|g" "$file" > "$work/$name.yaml"
  taskset -c 0 "$exe" --config "$work/$name.yaml" --concurrency 1 --log-level warn \
    >"$work/$name.log" 2>&1 &
  extra_pid[$name]=$! extra_port[$name]=$next_port
  extra_targets="$extra_targets $name"
done
taskset -c 0 nginx -c "$work/nginx.conf" >/dev/null 2>&1 &
taskset -c 0 haproxy -f "$work/haproxy.cfg" >/dev/null 2>&1 &
haproxy_pid=$!
for _ in $(seq 50); do
  [ -f "$work/nginx.pid" ] && [ -f "$work/upstream.pid" ] && curl -sf "http://127.0.0.1:$weft_port/" >/dev/null && break
  sleep 0.1
done
nginx_pid=$(pgrep -P "$(cat "$work/nginx.pid")" | head -1)

targets=${TARGETS:-"weft$extra_targets nginx haproxy"}
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
now_ns() { date +%s%N; }
results=$work/results
: > "$results"
for round in $(seq "$rounds"); do
  for mode in $modes; do
    for target in $targets; do
      case $target in
        weft) port=$weft_port pid=$weft_pid ;;
        weft-*) port=${extra_port[$target]} pid=${extra_pid[$target]} ;;
        nginx) port=$nginx_port pid=$nginx_pid
               [ "$mode" = h2 ] && port=$((nginx_port + 100)) ;;
        haproxy) port=$haproxy_port pid=$haproxy_pid ;;
      esac
      before=$(cpu_ticks "$pid"); start=$(now_ns)
      if [ "$mode" = h1 ]; then
        out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${seconds}s" --latency ${WRK_SCRIPT:+-s "$WRK_SCRIPT"} \
          "http://127.0.0.1:$port/" 2>&1)
        total=$(awk '/requests in/ {print $1}' <<<"$out")
        # wrk's latency distribution: `99%  1.23ms` (us, ms or s).
        p99=$(awk '$1 == "99%" { v = $2; u = 1;
          if (v ~ /us$/) { sub(/us$/, "", v) } else if (v ~ /ms$/) { sub(/ms$/, "", v); u = 1000 }
          else if (v ~ /s$/) { sub(/s$/, "", v); u = 1000000 }
          printf "%.0f", v * u }' <<<"$out")
        errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
      elif [ "$mode" = rate ]; then
        out=$(taskset -c 1 "$bin/weft-bench" load --target "http://127.0.0.1:$port/" --rate "$RATE" \
          --connections "$conns" --duration "${seconds}s" --threads 1 --json 2>/dev/null)
        read -r total p99 errors < <(python3 -c 'import json, sys
r = json.load(sys.stdin)
late = r["schedule"]["late_sends"] if r.get("schedule") else 0
errors = r["errors"]
failed = sum(errors.values())
print(r["requests"]["completed"], r["latency"]["p99_us"],
      ("errored_%d" % failed if failed else "") + (" generator_late_%d" % late if late else ""))' <<<"$out")
      else
        out=$(taskset -c 1 h2load -c4 -m8 -D"$seconds" "http://127.0.0.1:$port/" 2>&1)
        # h2load reports no percentiles.
        p99=na
        total=$(awk '/^requests:/ {print $8}' <<<"$out")
        errors=$(awk '/^requests:/ && $10 != 0 {print "errored " $10}' <<<"$out")
      fi
      after=$(cpu_ticks "$pid"); end=$(now_ns)
      awk -v t=$((after - before)) -v n="$total" -v hz="$hz" -v ns=$((end - start)) \
          -v r="$round" -v m="$mode" -v tg="$target" -v e="$errors" -v p99="$p99" 'BEGIN {
        cpu = t / hz; wall = ns / 1e9;
        printf "round=%s mode=%s target=%s rps=%.0f cpu_us_per_request=%.1f proxy_core_busy=%.0f%% p99_us=%s %s\n",
          r, m, tg, n / wall, cpu * 1e6 / n, 100 * cpu / wall, p99, e
      }' | tee -a "$results"
    done
  done
done
echo
echo "medians over $rounds rounds (wrk -t1 -c$conns; h2load -c4 -m8${RATE:+; weft-bench load --rate $RATE --connections $conns}; ${seconds}s each):"
for mode in $modes; do
  for target in $targets; do
    rows=$(grep " mode=$mode target=$target " "$results")
    p99=$(sed 's/.* p99_us=\([0-9a-z]*\).*/\1/' <<<"$rows" | sort -n |
      awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
    # Each figure's own median (the rps of the median-CPU round is not the
    # median rps); the core's business as its range over the rounds.
    rps=$(sed 's/.*rps=\([0-9.]*\) .*/\1/' <<<"$rows" | sort -n |
      awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
    sed 's/.*cpu_us_per_request=\([0-9.]*\) proxy_core_busy=\([0-9]*\)%.*/\1 \2/' <<<"$rows" |
      sort -k1 -n | awk -v m="$mode" -v tg="$target" -v p99="$p99" -v rps="$rps" '
        { cpu[NR] = $1; busy[NR] = $2; if (NR == 1 || $2 < lo) lo = $2; if (NR == 1 || $2 > hi) hi = $2 }
        END { i = int((NR + 1) / 2); printf "%s %-9s cpu_us_per_request=%s rps=%s proxy_core_busy=%s-%s%% p99_us=%s\n", m, tg, cpu[i], rps, lo, hi, p99 }'
  done
done
# Ratios within each round, where both targets met the same load on the
# same machine minutes apart, vary less than the medians above, which a
# busy neighbour moves round by round: these are what RESULTS.md quotes.
base=${targets%% *}
echo
echo "ratios to $base (each the median of the rounds' own ratios; their range in brackets):"
for mode in $modes; do
  for target in $targets; do
    [ "$target" = "$base" ] && continue
    awk -v m="$mode" -v b="$base" -v tg="$target" '
      function field(name,   i) {
        for (i = 1; i <= NF; i++) if (index($i, name "=") == 1) return substr($i, length(name) + 2)
        return ""
      }
      # The median and range of v[1..n], sorted in place.
      function summary(v, n,   i, j, x) {
        if (n == 0) return "na"
        for (i = 2; i <= n; i++) { x = v[i]; for (j = i - 1; j >= 1 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
        return sprintf("%.3f (%.2f-%.2f)", v[int((n + 1) / 2)], v[1], v[n])
      }
      $2 == "mode=" m {
        r = field("round"); t = field("target")
        if (t == b) { bc[r] = field("cpu_us_per_request"); br[r] = field("rps"); bp[r] = field("p99_us") }
        if (t == tg) { tc[r] = field("cpu_us_per_request"); tr[r] = field("rps"); tp[r] = field("p99_us") }
      }
      END {
        for (r in tc) if ((r in bc) && bc[r] > 0 && br[r] > 0) {
          c[++n] = tc[r] / bc[r]; q[n] = tr[r] / br[r]
          if (bp[r] + 0 > 0 && tp[r] + 0 > 0) p[++np] = tp[r] / bp[r]
        }
        printf "%s %s/%s cpu_us_per_request=%s rps=%s p99_us=%s\n", m, tg, b, summary(c, n), summary(q, n), summary(p, np)
      }' "$results"
  done
done
