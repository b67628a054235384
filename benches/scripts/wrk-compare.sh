#!/usr/bin/env bash
# Interim side-by-side measurement until `weft-bench compare` lands:
# HTTP/1.1 keep-alive GETs through weft-proxy, nginx and HAProxy (one
# worker each, pinned to CPU 0), against the weft-bench echo upstream, with
# wrk and the upstream pinned to CPU 1. Reports requests/s, wrk's mean
# latency and the process CPU time per request (utime+stime from /proc).
#
# Needs: a release build (cargo build --release -p weft-proxy -p weft-bench),
# wrk, nginx, haproxy (apt-get install -y wrk nginx-light haproxy), taskset.
# Usage: benches/scripts/wrk-compare.sh [ROUNDS] [SECONDS] [CONNECTIONS]
set -euo pipefail
rounds=${1:-3}; seconds=${2:-5}; conns=${3:-16}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/target/release
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; [ -f $work/nginx.pid ] && kill $(cat $work/nginx.pid) 2>/dev/null; rm -rf $work' EXIT
echo_port=19181 weft_port=19180 nginx_port=19182 haproxy_port=19183

cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream echo { server 127.0.0.1:$echo_port; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / { proxy_pass http://echo; proxy_http_version 1.1; proxy_set_header Connection ""; }
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
  bind 127.0.0.1:$haproxy_port
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:$echo_port
HAPROXY

taskset -c 1 "$bin/weft-bench" echo --listen 127.0.0.1:$echo_port --concurrency 1 >/dev/null 2>&1 &
echo_pid=$!
taskset -c 0 "$bin/weft-proxy" --listen 127.0.0.1:$weft_port --upstream 127.0.0.1:$echo_port \
  --concurrency 1 --log-level warn >/dev/null 2>&1 &
weft_pid=$!
taskset -c 0 nginx -c "$work/nginx.conf" >/dev/null 2>&1 &
taskset -c 0 haproxy -f "$work/haproxy.cfg" >/dev/null 2>&1 &
haproxy_pid=$!
sleep 1
nginx_pid=$(pgrep -P "$(cat "$work/nginx.pid")" | head -1)

cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)
echo "idle RSS KiB: weft=$(rss $weft_pid) nginx-worker=$(rss $nginx_pid) haproxy=$(rss $haproxy_pid)"
for round in $(seq "$rounds"); do
  for target in direct weft nginx haproxy; do
    case $target in
      direct) port=$echo_port pid=$echo_pid ;;
      weft) port=$weft_port pid=$weft_pid ;;
      nginx) port=$nginx_port pid=$nginx_pid ;;
      haproxy) port=$haproxy_port pid=$haproxy_pid ;;
    esac
    before=$(cpu "$pid")
    out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${seconds}s" "http://127.0.0.1:$port/" 2>&1)
    after=$(cpu "$pid")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    latency=$(awk '/Latency/ {print $2}' <<<"$out")
    us=$(awk -v t=$((after - before)) -v n="$total" -v hz="$hz" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
    echo "round=$round target=$target rps=$rps mean_latency=$latency cpu_us_per_request=$us (of the $target process; direct = the echo)"
  done
done
