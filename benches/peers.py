#!/usr/bin/env python3
"""Side by side: HAProxy, nginx stream, socat, the floor and our proxy.

Run through `benches/peers.sh`, which installs the peers, builds the
release binary and passes the kube-userspace-proxy targets as arguments:

    NAME=PORT=COMMAND   a proxy started by this script (stopped at the end)
                        forwarding PORT to the HTTP backend, PORT+1 to the
                        iperf3 backend and PORT+2 to the redis backend.

Backends: nginx answering "ok" to every request (HTTP port 18080), an
iperf3 server (15201) and redis-server (16379, no persistence; the one key
redis-benchmark's GET reads is set beforehand, so every GET is a hit).
Peers listen on PORT..PORT+2 of BENCH_LISTEN, backends on BENCH_BACKEND
(both 127.0.0.1 by default). With BENCH_NS=CLIENT,PROXY,BACKEND (set by
`BENCH_NETNS=1 benches/peers.sh`, which creates those network namespaces)
clients run in the first, proxies in the second and backends in the third.

Workloads, interleaved across targets each round, medians reported:
  keepalive   wrk, CONNS keep-alive connections: requests/s, p99
  close       wrk with `Connection: close`: one new TCP connection a request
  pipelined   wrk, CONNS connections each keeping DEPTH requests in flight
              (replies coalesce): requests/s
  bulk1/4     iperf3 with 1 and 4 streams: Gbit/s
  redis       redis-benchmark GET, CONNS clients, one request in flight each
              (P1) and DEPTH (pipelined by a real client): requests/s; the
              request count is sized from the previous run on that target to
              last about SECONDS (a first, uncounted run calibrates)
For every wrk and redis workload the proxy's CPU time (user + system of its
whole process group, from /proc) is divided by the requests served: CPU µs
per request, the proxy's cost on a node whose CPUs it shares with workloads.

Environment: BENCH_SECONDS (4), BENCH_ROUNDS (3), BENCH_CONNS (32),
BENCH_DEPTH (16), BENCH_JSON (where to write the medians as JSON),
BENCH_ONLY (comma-separated target names to keep), BENCH_ROWS (which
workloads to run, of keepalive,close,pipelined,bulk,redis: all by
default; the others read 0).
"""
import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HTTP = 18080
IPERF = 15201
REDIS = 16379
# redis-benchmark without -r reads this very key on every GET.
REDIS_KEY = "key:__rand_int__"
SECONDS = int(os.environ.get("BENCH_SECONDS", "4"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNS = int(os.environ.get("BENCH_CONNS", "32"))
DEPTH = int(os.environ.get("BENCH_DEPTH", "16"))
ROWS = os.environ.get("BENCH_ROWS", "keepalive,close,pipelined,bulk,redis").split(",")
LISTEN = os.environ.get("BENCH_LISTEN", "127.0.0.1")
BACKEND = os.environ.get("BENCH_BACKEND", "127.0.0.1")
if os.environ.get("BENCH_NS"):
    CLIENT_NS, PROXY_NS, BACKEND_NS = os.environ["BENCH_NS"].split(",")
elif os.environ.get("BENCH_NETNS") == "1":
    sys.exit("BENCH_NETNS=1: run benches/peers.sh, which creates the namespaces")
else:
    CLIENT_NS = PROXY_NS = BACKEND_NS = None

# Columns: (key, heading, lower is better)
COLUMNS = [
    ("keepalive_rps", "keep-alive req/s", False),
    ("keepalive_p99_us", "keep-alive p99 µs", True),
    ("keepalive_cpu_us", "CPU µs/req keep-alive", True),
    ("keepalive_host_us", "host CPU µs/req keep-alive", True),
    ("close_rps", "new conn req/s", False),
    ("close_cpu_us", "CPU µs/req new conn", True),
    ("pipelined_rps", "pipelined req/s", False),
    ("pipelined_cpu_us", "CPU µs/req pipelined", True),
    ("bulk1_gbps", "bulk 1 Gbit/s", False),
    ("bulk4_gbps", "bulk 4 Gbit/s", False),
    ("redis1_rps", "redis GET/s P1", False),
    ("redis1_cpu_us", "CPU µs/GET P1", True),
    ("redisp_rps", f"redis GET/s P{DEPTH}", False),
    ("redisp_cpu_us", f"CPU µs/GET P{DEPTH}", True),
]
HAPROXY = ("haproxy", "haproxy-splice")


class Bench:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kusp-peers-")
        self.procs = []
        self.groups = {}  # target name -> process group id of its proxy
        self.ports = {"direct": None}
        self.redis_rate = {}  # (target, depth) -> GET/s of its last run

    # -- processes -------------------------------------------------------
    def spawn(self, name, argv, ns):
        """Starts argv (a list, or a shell command line) in network namespace
        ns, in a process group of its own: the group is the target's CPU."""
        log = open(os.path.join(self.dir, "stderr.log"), "a")
        p = subprocess.Popen(in_ns(ns, argv), stdout=subprocess.DEVNULL,
                             stderr=log, start_new_session=True)
        self.procs.append(p)
        if name:
            self.groups[name] = p.pid
        return p

    def stop(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def file(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    @staticmethod
    def host_cpu_seconds():
        """Busy CPU seconds of the whole machine (every process, kernel
        threads and softirq included): what a kernel offload moves out of
        the proxy's own process still shows here."""
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # minus idle and iowait
        return busy / os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self, name):
        """User + system CPU seconds of the target's process group (0 for direct)."""
        group = self.groups.get(name)
        if group is None:
            return 0.0
        ticks = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group:
                ticks += sum(int(x) for x in fields[11:15])
        return ticks / os.sysconf("SC_CLK_TCK")

    # -- set-up ------------------------------------------------------------
    def backends(self):
        conf = self.file("backend.conf", f"""
daemon off; worker_processes 1; pid {self.dir}/backend.pid; error_log {self.dir}/backend.err;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 10000000;
  server {{ listen {BACKEND}:{HTTP} backlog=4096; location / {{ return 200 "ok"; }} }} }}
""")
        self.spawn(None, ["nginx", "-c", conf, "-p", self.dir], BACKEND_NS)
        self.spawn(None, ["iperf3", "-s", "-B", BACKEND, "-p", str(IPERF)], BACKEND_NS)
        self.spawn(None, ["redis-server", "--bind", BACKEND, "--port", str(REDIS), "--save", "",
                          "--appendonly", "no", "--protected-mode", "no", "--dir", self.dir],
                   BACKEND_NS)
        if wait_ports(BACKEND, [HTTP, IPERF, REDIS]):
            sys.exit("backends did not start (see " + self.dir + "/stderr.log)")
        self.redis_cli("SET", REDIS_KEY, "xxx")  # redis-benchmark's default 3-byte value

    def redis_cli(self, *args):
        return subprocess.run(in_ns(BACKEND_NS, ["redis-cli", "-h", BACKEND, "-p", str(REDIS), *args]),
                              capture_output=True, text=True, check=True, timeout=10).stdout

    def peers(self, extra):
        if shutil.which("haproxy"):
            base = f"""
global
  maxconn 4000
defaults
  mode tcp
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  retries 3
  option redispatch
  SPLICE
frontend http
  bind {LISTEN}:PORT0
  default_backend http
backend http
  server s1 {BACKEND}:{HTTP}
frontend bulk
  bind {LISTEN}:PORT1
  default_backend bulk
backend bulk
  server s1 {BACKEND}:{IPERF}
frontend redis
  bind {LISTEN}:PORT2
  default_backend redis
backend redis
  server s1 {BACKEND}:{REDIS}
"""
            # splice-auto: recv/send until reads fill a buffer (rarely splices on
            # loopback); the second row forces splice both ways.
            for name, port, splice in [("haproxy", 28100, "option splice-auto"),
                                       ("haproxy-splice", 28110, "option splice-request\n  option splice-response")]:
                conf = base.replace("SPLICE", splice)
                for i in range(3):
                    conf = conf.replace(f"PORT{i}", str(port + i))
                self.spawn(name, ["haproxy", "-f", self.file(name + ".cfg", conf)], PROXY_NS)
                self.ports[name] = port
        stream = "/usr/lib/nginx/modules/ngx_stream_module.so"
        if os.path.exists(stream) and os.environ.get("BENCH_NGINX", "1") == "1":
            conf = self.file("stream.conf", f"""
load_module {stream};
daemon off; worker_processes auto; pid {self.dir}/stream.pid; error_log {self.dir}/stream.err;
events {{ worker_connections 20000; }}
stream {{
  server {{ listen {LISTEN}:28120 backlog=4096; proxy_pass {BACKEND}:{HTTP}; }}
  server {{ listen {LISTEN}:28121; proxy_pass {BACKEND}:{IPERF}; }}
  server {{ listen {LISTEN}:28122 backlog=4096; proxy_pass {BACKEND}:{REDIS}; }}
}}
""")
            self.spawn("nginx-stream", ["nginx", "-c", conf, "-p", self.dir], PROXY_NS)
            self.ports["nginx-stream"] = 28120
        if shutil.which("socat") and os.environ.get("BENCH_SOCAT", "1") == "1":
            listen = f"fork,reuseaddr,backlog=4096,bind={LISTEN}"
            self.spawn("socat", f"socat TCP-LISTEN:28130,{listen} TCP:{BACKEND}:{HTTP}"
                                f" & socat TCP-LISTEN:28131,{listen} TCP:{BACKEND}:{IPERF}"
                                f" & exec socat TCP-LISTEN:28132,{listen} TCP:{BACKEND}:{REDIS}", PROXY_NS)
            self.ports["socat"] = 28130
        for spec in extra:
            name, port, cmd = spec.split("=", 2)
            self.spawn(name, cmd, PROXY_NS)
            self.ports[name] = int(port)
        only = os.environ.get("BENCH_ONLY")
        for name, port in list(self.ports.items()):
            if only and name not in only.split(",") and name not in HAPROXY:
                del self.ports[name]
            elif port and wait_ports(LISTEN, [port, port + 1, port + 2]):
                print(f"# {name} did not open ports {port} to {port + 2}: left out", file=sys.stderr)
                del self.ports[name]

    # -- workloads ---------------------------------------------------------
    def wrk(self, name, port, mode):
        url = f"http://{address(port)}:{port or HTTP}/"
        argv = ["wrk", "-t1", f"-c{CONNS}", f"-d{SECONDS}s", "--latency"]
        if mode == "close":
            argv += ["-H", "Connection: close"]
        elif mode == "pipelined":
            argv += ["-s", self.file("pipeline.lua", PIPELINE.replace("DEPTH", str(DEPTH)))]
        before, host_before = self.cpu_seconds(name), self.host_cpu_seconds()
        out = client(argv + [url], SECONDS + 30).stdout
        cpu = self.cpu_seconds(name) - before
        self.host_cpu = self.host_cpu_seconds() - host_before
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
        p99_us = float(p99.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[p99.group(2)] if p99 else 0.0
        errors = re.findall(r"Non-2xx or 3xx responses: \d+|Socket errors: .*", out)
        return rps, p99_us, cpu * 1e6 / max(requests, 1), errors

    def iperf(self, port, streams):
        """Gbit/s received; iperf3's server takes one test at a time, so a
        refused start (the previous test still closing) is retried."""
        host, port = address(port), port + 1 if port else IPERF
        for attempt in range(3):
            out = client(["iperf3", "-c", host, "-p", str(port), "-t", str(SECONDS),
                          "-P", str(streams), "-J"], SECONDS + 30).stdout
            try:
                return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
            except (ValueError, KeyError):
                time.sleep(1 + attempt)
        print(f"# iperf3 via port {port} failed three times: {out[-300:]}", file=sys.stderr)
        return float("nan")

    def redis(self, name, port, depth):
        """GET/s and the proxy's CPU µs per GET, redis-benchmark with CONNS
        clients of depth requests in flight each. The request count is the
        last run's rate × SECONDS; the first run on a target calibrates."""
        rate = self.redis_rate.get((name, depth))
        if rate is None:
            self.redis_run(name, port, depth, 10_000 * depth)
            rate = self.redis_rate.get((name, depth), 10_000)
        return self.redis_run(name, port, depth, max(int(rate * SECONDS), 1000))

    def redis_run(self, name, port, depth, requests):
        argv = ["redis-benchmark", "-h", address(port), "-p", str(port + 2 if port else REDIS),
                "-c", str(CONNS), "-n", str(requests), "-P", str(depth), "-t", "get", "--csv"]
        before = self.cpu_seconds(name)
        out = client(argv, 3 * SECONDS + 60)
        cpu = self.cpu_seconds(name) - before
        rows = [r for r in csv.reader(out.stdout.splitlines()) if r and r[0] == "GET"]
        if out.returncode or not rows:
            return float("nan"), float("nan"), [f"redis-benchmark: {(out.stderr or out.stdout)[-200:]}"]
        rps = float(rows[0][1])
        self.redis_rate[(name, depth)] = rps
        return rps, cpu * 1e6 / requests, []

    def run(self):
        samples = {n: {k: [] for k, _, _ in COLUMNS} | {"errors": []} for n in self.ports}
        for _ in range(ROUNDS):
            for name, port in self.ports.items():
                s = samples[name]
                for mode in [m for m in ("keepalive", "close", "pipelined") if m in ROWS]:
                    rps, p99, cpu, errors = self.wrk(name, port, mode)
                    s[f"{mode}_rps"].append(rps)
                    s[f"{mode}_cpu_us"].append(cpu)
                    if mode == "keepalive":
                        s["keepalive_p99_us"].append(p99)
                        s["keepalive_host_us"].append(self.host_cpu * 1e6 / max(rps * SECONDS, 1))
                    s["errors"] += errors
                if "bulk" in ROWS:
                    s["bulk1_gbps"].append(self.iperf(port, 1))
                    s["bulk4_gbps"].append(self.iperf(port, 4))
                if "redis" in ROWS:
                    for key, depth in (("redis1", 1), ("redisp", DEPTH)):
                        rps, cpu, errors = self.redis(name, port, depth)
                        s[f"{key}_rps"].append(rps)
                        s[f"{key}_cpu_us"].append(cpu)
                        s["errors"] += errors
        return {n: {k: statistics.median(s[k] or [0]) for k, _, _ in COLUMNS} | {"errors": s["errors"][:3]}
                for n, s in samples.items()}


PIPELINE = """
-- DEPTH requests written back to back on each connection; wrk counts each reply.
init = function(args)
  local r = {}
  for i = 1, DEPTH do r[i] = wrk.format(nil, "/") end
  req = table.concat(r)
end
request = function() return req end
"""


def in_ns(ns, argv):
    """argv (a list, or a shell command line) to run in network namespace
    ns; None: where this script runs."""
    if isinstance(argv, str):
        argv = ["sh", "-c", argv]
    return ["ip", "netns", "exec", ns, *argv] if ns else argv


def client(argv, timeout):
    """Runs a load generator where the clients are; its completed process."""
    return subprocess.run(in_ns(CLIENT_NS, argv), capture_output=True, text=True, timeout=timeout)


def address(port):
    """Where a client connects: a proxy (port given) or the backend itself
    (the direct row)."""
    return LISTEN if port else BACKEND


# Run by wait_ports in the clients' namespace: prints the ports that did not
# accept a connection within their 15 s.
PROBE = """
import socket, sys, time
host, ports = sys.argv[1], sys.argv[2:]
for port in ports:
    end = time.time() + 15
    while True:
        try:
            socket.create_connection((host, int(port)), 0.2).close()
            break
        except OSError:
            if time.time() > end:
                print(port)
                break
            time.sleep(0.05)
"""


def wait_ports(host, ports):
    """The ports of host that a client could not connect to (empty: all up)."""
    out = client([sys.executable, "-c", PROBE, host, *map(str, ports)], 15 * len(ports) + 30)
    return out.stdout.split()


def table(summary, value, title):
    print(f"\n{title}\n")
    print("| target | " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, s in summary.items():
        print(f"| {name} | " + " | ".join(value(name, k, lower) for k, _, lower in COLUMNS) + " |")


def report(summary):
    print(f"# medians of {ROUNDS} rounds × {SECONDS} s, {CONNS} connections, pipeline depth {DEPTH}, "
          f"{os.cpu_count()} CPUs, " + (f"netns: clients in {CLIENT_NS}, proxies on {LISTEN} in {PROXY_NS}, "
                                       f"backends on {BACKEND} in {BACKEND_NS}" if CLIENT_NS else "loopback"))
    def absolute(name, k, _lower):
        v = summary[name][k]
        return f"{v:,.2f}" if k.endswith("gbps") or k.endswith("cpu_us") else f"{v:,.0f}"
    table(summary, absolute, "Absolute")
    peers = [n for n in HAPROXY if n in summary]
    if not peers:
        return
    def ratio(name, k, lower):
        best = (min if lower else max)(summary[p][k] for p in peers)
        v = summary[name][k]
        return f"{v / best:.2f}" if best else "-"
    table(summary, ratio, "Ratio to the better HAProxy row in each column (lower is better for p99 and CPU)")
    for name, s in summary.items():
        if s["errors"]:
            print(f"# {name} errors: " + "; ".join(s["errors"]))


def main():
    # SIGTERM (peers.sh passes an interrupt on so) unwinds: `finally` stops the processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench()
    try:
        bench.backends()
        bench.peers(sys.argv[1:])
        summary = bench.run()
        report(summary)
        stats = dict(line.split(":", 1) for line in bench.redis_cli("INFO", "stats").split() if ":" in line)
        print(f"# redis GETs: {stats.get('keyspace_hits')} hits, {stats.get('keyspace_misses')} misses")
        out = os.environ.get("BENCH_JSON")
        if out:
            with open(out, "w") as f:
                json.dump(summary, f, indent=1)
    finally:
        bench.stop()


if __name__ == "__main__":
    main()
