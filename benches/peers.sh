#!/usr/bin/env bash
# Side-by-side on loopback: HAProxy, nginx stream, socat and
# kube-userspace-proxy in splice and copy mode, all in front of the same
# nginx and iperf3 backends, driven by benches/peers.py (wrk keep-alive,
# new connection per request and pipelined, CPU per request, iperf3 1 and
# 4 streams).
# Usage: benches/peers.sh   (env: BENCH_SECONDS, BENCH_ROUNDS, BENCH_CONNS,
# BENCH_DEPTH, BENCH_ONLY, BENCH_JSON; see benches/peers.py).
# BENCH_BASELINE=PATH adds a `kusp-base` row: another build of ours (an
# earlier commit's release binary) in auto mode, measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=0
for tool in nginx haproxy socat wrk iperf3; do command -v "$tool" >/dev/null || missing=1; done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing=1
if [ "$missing" = 1 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    nginx libnginx-mod-stream haproxy socat wrk iperf3 >/dev/null
fi

cargo build --release --quiet
bin=$PWD/target/release/kube-userspace-proxy
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Two services per proxy: HTTP on PORT (→ nginx 18080), bulk on PORT+1
# (→ iperf3 15201), as peers.py expects.
manifests() { # dir port
  mkdir -p "$1"
  local http=$2 bulk=$(($2 + 1)) name target np
  for pair in "http:18080:$http" "bulk:15201:$bulk"; do
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
endpoints: [{addresses: ["127.0.0.1"]}]
YAML
  done
}
manifests "$work/auto" 28090
manifests "$work/splice" 28092
manifests "$work/copy" 28094
manifests "$work/auto1" 28096
common="--bind-address 127.0.0.1 --iptables off --metrics-bind-address 127.0.0.1:0 --healthz-bind-address 127.0.0.1:0 --log-level warn"

# The floor: a minimal C epoll proxy (benches/floor.c) with no work of its
# own, so its row is what the kernel alone costs; the gap between it and a
# kusp row is ours. Left out when no C compiler is there.
floor=()
if command -v cc >/dev/null && cc -O2 -pthread -o "$work/floor" benches/floor.c; then
  floor=("floor=28098=$work/floor 28098 $(nproc)")
fi

base=()
if [ -n "${BENCH_BASELINE:-}" ]; then
  manifests "$work/base" 28100
  base=("kusp-base=28100=$BENCH_BASELINE --manifests $work/base $common")
fi

echo "# $(date -u +%F) $(nproc) cpus, $(uname -r); kube-userspace-proxy $(git rev-parse --short HEAD)"
# kusp-auto is what a user gets: no flags beyond the addresses.
python3 benches/peers.py \
  "kusp-auto=28090=$bin --manifests $work/auto $common" \
  "kusp-splice=28092=$bin --manifests $work/splice --copy-mode splice $common" \
  "kusp-copy=28094=$bin --manifests $work/copy --copy-mode copy $common" \
  "kusp-auto-1t=28096=$bin --manifests $work/auto1 --worker-threads 1 $common" \
  "${floor[@]}" "${base[@]}"
