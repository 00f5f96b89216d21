#!/usr/bin/env bash
# Side-by-side: HAProxy, nginx stream, socat, the floor and
# kube-userspace-proxy in splice and copy mode, all in front of the same
# nginx, iperf3 and redis backends, driven by benches/peers.py (wrk
# keep-alive, new connection per request and pipelined, CPU per request,
# iperf3 1 and 4 streams, redis-benchmark GET unpipelined and pipelined).
# Every target forwards three ports: PORT → HTTP 18080, PORT+1 → iperf3
# 15201, PORT+2 → redis 16379; each has a block of 10 ports from 28100.
#
# Usage: benches/peers.sh   (env: BENCH_SECONDS, BENCH_ROUNDS, BENCH_CONNS,
# BENCH_DEPTH, BENCH_ONLY, BENCH_JSON; see benches/peers.py).
# BENCH_BASELINE=PATH adds a `kusp-base` row: another build of ours (an
# earlier commit's release binary) in auto mode, measured in the same run.
# BENCH_NETNS=1 (root only): instead of everything on loopback, three
# network namespaces joined by veth pairs, as on a node:
#   client ns 10.201.1.2 ⇄ 10.201.1.1 proxy ns 10.201.2.1 ⇄ 10.201.2.2 backend ns
# clients (wrk, iperf3 -c, redis-benchmark) in the first, every proxy
# listening on 10.201.1.1 in the second, the backends in the third; the
# `direct` row is routed through the proxy ns (ip_forward). The namespaces
# are created here and deleted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${BENCH_NETNS:-0}" = 1 ] && [ "$(id -u)" != 0 ]; then
  echo "peers.sh: BENCH_NETNS=1 creates network namespaces and needs root" >&2
  exit 1
fi

missing=0
for tool in nginx haproxy socat wrk iperf3 redis-server redis-benchmark redis-cli; do
  command -v "$tool" >/dev/null || missing=1
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing=1
if [ "$missing" = 1 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    nginx libnginx-mod-stream haproxy socat wrk iperf3 redis-server redis-tools >/dev/null
fi

cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/kube-userspace-proxy
work=$(mktemp -d)
namespaces=()
cleanup() {
  local ns
  for ns in "${namespaces[@]}"; do
    # Whatever peers.py left running in our namespaces (it stops its own).
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    ip netns delete "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Where proxies listen (clients connect) and where the backends are.
listen=127.0.0.1 backend=127.0.0.1 mode=loopback
if [ "${BENCH_NETNS:-0}" = 1 ]; then
  client_ns=kusp-bench-client-$$ proxy_ns=kusp-bench-proxy-$$ backend_ns=kusp-bench-backend-$$
  for ns in "$client_ns" "$proxy_ns" "$backend_ns"; do
    ip netns add "$ns"
    namespaces+=("$ns")
    ip -n "$ns" link set lo up
  done
  # veth ends are created inside their namespaces: no name in the host's.
  ip link add c0 netns "$client_ns" type veth peer name p0 netns "$proxy_ns"
  ip link add p1 netns "$proxy_ns" type veth peer name b0 netns "$backend_ns"
  ip -n "$client_ns" addr add 10.201.1.2/24 dev c0
  ip -n "$proxy_ns" addr add 10.201.1.1/24 dev p0
  ip -n "$proxy_ns" addr add 10.201.2.1/24 dev p1
  ip -n "$backend_ns" addr add 10.201.2.2/24 dev b0
  for pair in "$client_ns:c0" "$proxy_ns:p0" "$proxy_ns:p1" "$backend_ns:b0"; do
    ip -n "${pair%%:*}" link set "${pair#*:}" up
  done
  # Only the direct row needs these: proxied traffic never leaves a subnet.
  ip -n "$client_ns" route add default via 10.201.1.1
  ip -n "$backend_ns" route add default via 10.201.2.1
  ip netns exec "$proxy_ns" sysctl -qw net.ipv4.ip_forward=1
  listen=10.201.1.1 backend=10.201.2.2
  mode="netns, veth MTU $(ip netns exec "$proxy_ns" cat /sys/class/net/p0/mtu)"
  export BENCH_NS="$client_ns,$proxy_ns,$backend_ns"
fi
export BENCH_LISTEN=$listen BENCH_BACKEND=$backend

# Three services per proxy: HTTP on PORT (→ nginx 18080), bulk on PORT+1
# (→ iperf3 15201), redis on PORT+2 (→ redis 16379), as peers.py expects.
manifests() { # dir port
  mkdir -p "$1"
  local name target np
  for pair in "http:18080:$2" "bulk:15201:$(($2 + 1))" "redis:16379:$(($2 + 2))"; do
    IFS=: read -r name target np <<<"$pair"
    cat >"$1/$name.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: $name, namespace: bench}
spec:
  type: NodePort
  ports: [{name: tcp, port: 80, nodePort: $np}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: $name-1, namespace: bench, labels: {kubernetes.io/service-name: $name}}
addressType: IPv4
ports: [{name: tcp, port: $target}]
endpoints: [{addresses: ["$backend"]}]
YAML
  done
}
manifests "$work/auto" 28140
manifests "$work/splice" 28150
manifests "$work/copy" 28160
manifests "$work/auto1" 28170
common="--bind-address $listen --iptables off --metrics-bind-address 127.0.0.1:0 --healthz-bind-address 127.0.0.1:0 --log-level warn"

# The floor: a minimal C epoll proxy (benches/floor.c) with no work of its
# own, so its row is what the kernel alone costs; the gap between it and a
# kusp row is ours. Left out when no C compiler is there.
floor=()
if command -v cc >/dev/null && cc -O2 -pthread -o "$work/floor" benches/floor.c; then
  floor=("floor=28180=$work/floor 28180 $(nproc) $listen $backend")
  # BENCH_FLOOR_SHARED=1: also the floor sharing each port HAProxy's way
  # (one listener in every thread's epoll with EPOLLEXCLUSIVE, a bounded
  # batch of accepts a wake-up); benches/README.md has what it measured.
  if [ "${BENCH_FLOOR_SHARED:-0}" = 1 ]; then
    floor+=("floor-shared=28210=env FLOOR_SHARED=1 $work/floor 28210 $(nproc) $listen $backend")
  fi
fi
# The same floor on io_uring (benches/floor_uring.c), where liburing is
# there to link: the yardstick of the io_uring gate (benches/README.md).
if command -v cc >/dev/null && cc -O2 -pthread -o "$work/floor_uring" benches/floor_uring.c -luring 2>/dev/null; then
  floor+=("floor-uring=28200=$work/floor_uring 28200 $(nproc) $listen $backend")
fi

base=()
if [ -n "${BENCH_BASELINE:-}" ]; then
  manifests "$work/base" 28190
  base=("kusp-base=28190=$BENCH_BASELINE --manifests $work/base $common")
fi

echo "# $(date -u +%F) $(nproc) cpus, $(uname -r); kube-userspace-proxy $(git rev-parse --short HEAD); $mode"
# kusp-auto is what a user gets: no flags beyond the addresses.
# In the background so that an interrupt reaches it at once (as SIGTERM: it
# stops what it started) rather than after the run.
python3 benches/peers.py \
  "kusp-auto=28140=$bin --manifests $work/auto $common" \
  "kusp-splice=28150=$bin --manifests $work/splice --copy-mode splice $common" \
  "kusp-copy=28160=$bin --manifests $work/copy --copy-mode copy $common" \
  "kusp-auto-1t=28170=$bin --manifests $work/auto1 --worker-threads 1 $common" \
  "${floor[@]}" "${base[@]}" &
harness=$!
trap 'kill -TERM "$harness" 2>/dev/null; wait "$harness"; exit 130' INT TERM
wait "$harness"
