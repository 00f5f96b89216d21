#!/usr/bin/env python3
"""User instructions per keep-alive request and per new connection, counted
by callgrind: repeatable for the same binary whatever else the machine does.

A threaded HTTP-like backend on 127.0.0.1:18999 answers every request with
141 bytes; the proxy (a release build, under `valgrind --tool=callgrind`)
serves NodePort 28300 in front of it. For each mode a Python client, 8
connections at a time, warms up with 800 requests, the counters are zeroed
(`callgrind_control -z`), N more requests run (keep-alive: 8 connections
kept open; new connection: 8 connections opened per 8 requests, each with
`Connection: close`) and the counters are dumped. Prints the instructions
per request and leaves the profiles (for `callgrind_annotate`) in a
temporary directory. Run from the repository root after `cargo build
--release`; `--binary PATH` for another build, `--requests N` (16,000).
"""
import argparse, glob, os, socket, socketserver, subprocess, tempfile, threading, time

PORT, BACKEND = 28300, 18999
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
MANIFEST = f"""apiVersion: v1
kind: Service
metadata: {{name: http, namespace: bench}}
spec:
  type: NodePort
  ports: [{{name: tcp, port: 80, nodePort: {PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: http-1, namespace: bench, labels: {{kubernetes.io/service-name: http}}}}
addressType: IPv4
ports: [{{name: tcp, port: {BACKEND}}}]
endpoints: [{{addresses: ["127.0.0.1"]}}]
"""


class Backend(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


class Answer(socketserver.BaseRequestHandler):
    def handle(self):
        pending = b""
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            pending += data
            while b"\r\n\r\n" in pending:
                head, pending = pending.split(b"\r\n\r\n", 1)
                self.request.sendall(RESPONSE)
                if b"close" in head:
                    return


def receive(s):
    got = 0
    while got < len(RESPONSE):
        data = s.recv(65536)
        if not data:
            raise RuntimeError("the proxy closed a connection early")
        got += len(data)


def client(mode, n):
    if mode == "keep-alive":
        socks = [socket.create_connection(("127.0.0.1", PORT)) for _ in range(8)]
        for _ in range(n // 8):
            for s in socks:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            for s in socks:
                receive(s)
        for s in socks:
            s.close()
        return
    for _ in range(n // 8):
        socks = [socket.create_connection(("127.0.0.1", PORT)) for _ in range(8)]
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        for s in socks:
            receive(s)
            s.recv(16)  # the end of the stream
            s.close()


def count(binary, mode, n, work):
    out = os.path.join(work, f"callgrind.{mode}")
    proxy = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary,
         "--manifests", os.path.join(work, "manifests"), "--bind-address", "127.0.0.1",
         "--iptables", "off", "--metrics-bind-address", "127.0.0.1:0",
         "--healthz-bind-address", "127.0.0.1:0", "--log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"{mode}.log"), "w"))
    try:
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"the proxy never listened on {PORT}: see {work}/{mode}.log")
        client(mode, 800)
        time.sleep(1)
        subprocess.run(["callgrind_control", "-z", str(proxy.pid)], check=True, capture_output=True)
        client(mode, n)
        subprocess.run(["callgrind_control", "-d", str(proxy.pid)], check=True, capture_output=True)
    finally:
        proxy.terminate()
        proxy.wait(60)
    # The dump after zeroing is the first numbered part.
    dump = sorted(glob.glob(out + ".*"))[0]
    totals = next(int(line.split()[1]) for line in open(dump) if line.startswith("totals:"))
    return totals / n, dump


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default="target/release/kube-userspace-proxy")
    ap.add_argument("--requests", type=int, default=16_000)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kusp-callgrind-")
    os.makedirs(os.path.join(work, "manifests"))
    with open(os.path.join(work, "manifests", "http.yaml"), "w") as f:
        f.write(MANIFEST)
    backend = Backend(("127.0.0.1", BACKEND), Answer)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        for mode, n in (("keep-alive", args.requests), ("new connection", args.requests // 4)):
            per, dump = count(os.path.abspath(args.binary), mode.replace(" ", "-"), n, work)
            print(f"{mode}: {per:,.0f} user instructions per request ({n:,} requests; {dump})")
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main()
