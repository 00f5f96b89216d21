#!/usr/bin/env python3
"""RSS and fds per idle proxied connection: HAProxy vs kube-userspace-proxy.

An asyncio echo backend on 127.0.0.1:15301; HAProxy (tcp mode) on 28095 and
the proxy (release build, splice mode) on 28097 in front of it. For each, N
connections (default 5000) are opened, each echoes one line, and all are held
idle; the proxy process's RSS and open fds are read from /proc before and
while they are held. Run from the repository root after `cargo build --release`.
"""
import asyncio, os, resource, signal, subprocess, sys, tempfile, time

N = int(os.environ.get("IDLE_CONNS", "5000"))
BACKEND = 15301
work = tempfile.mkdtemp(prefix="idle-bench-")


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


async def echo(reader, writer):
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass


async def hold(port):
    conns = []
    for wave in range(0, N, 500):
        async def one(i):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"hello {i}\n".encode())
            await w.drain()
            assert await r.readline() == f"hello {i}\n".encode()
            return r, w
        conns += await asyncio.gather(*(one(i) for i in range(wave, min(N, wave + 500))))
    return conns


def wait_port(port):
    import socket
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


async def measure(name, proc, port):
    wait_port(port)
    await asyncio.sleep(0.5)
    before = (rss_kib(proc.pid), fds(proc.pid))
    conns = await hold(port)
    await asyncio.sleep(1)
    held = (rss_kib(proc.pid), fds(proc.pid))
    for _, w in conns:
        w.close()
    proc.kill()
    proc.wait(10)
    drss, dfds = held[0] - before[0], held[1] - before[1]
    print(f"{name:14} {before[0]:>10} {held[0]:>10} {drss * 1024 / N:>14.0f} {before[1]:>8} {held[1]:>8} {dfds / N:>10.2f}")


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = await asyncio.start_server(echo, "127.0.0.1", BACKEND, backlog=4096)
    print(f"# {N} idle proxied connections (one echoed line each), {os.cpu_count()} cpus")
    print(f"{'target':14} {'RSS0 KiB':>10} {'RSS KiB':>10} {'B/conn':>14} {'fds0':>8} {'fds':>8} {'fds/conn':>10}")
    cfg = os.path.join(work, "haproxy.cfg")
    open(cfg, "w").write(f"""global
  maxconn 7000
defaults
  mode tcp
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  option splice-auto
frontend f
  bind 127.0.0.1:28095
  default_backend b
backend b
  server s1 127.0.0.1:{BACKEND}
""")
    await measure("haproxy", subprocess.Popen(["haproxy", "-f", cfg]), 28095)
    mdir = os.path.join(work, "m")
    os.makedirs(mdir)
    open(os.path.join(mdir, "idle.yaml"), "w").write(f"""apiVersion: v1
kind: Service
metadata: {{name: idle, namespace: bench}}
spec:
  type: NodePort
  ports: [{{name: tcp, port: 80, nodePort: 28097}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: idle-1, namespace: bench, labels: {{kubernetes.io/service-name: idle}}}}
addressType: IPv4
ports: [{{name: tcp, port: {BACKEND}}}]
endpoints: [{{addresses: ["127.0.0.1"]}}]
""")
    binary = os.environ.get("KUSP_BIN", "target/release/kube-userspace-proxy")
    proc = subprocess.Popen([binary, "--manifests", mdir, "--bind-address", "127.0.0.1", "--iptables", "off",
                             "--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0",
                             "--log-level", "warn"])
    await measure("kusp-auto", proc, 28097)
    server.close()


asyncio.run(main())
