#!/usr/bin/env python3
"""Side by side on loopback: HAProxy, nginx stream, socat and our proxy.

Run through `benches/peers.sh`, which installs the peers, builds the
release binary and passes the kube-userspace-proxy targets as arguments:

    NAME=PORT=COMMAND   a proxy started by this script (stopped at the end)
                        forwarding PORT to the HTTP backend and PORT+1 to
                        the iperf3 backend.

Backends, all on 127.0.0.1: nginx answering "ok" to every request (HTTP
port 18080) and an iperf3 server (15201).

Workloads, interleaved across targets each round, medians reported:
  keepalive   wrk, CONNS keep-alive connections: requests/s, p99
  close       wrk with `Connection: close`: one new TCP connection a request
  pipelined   wrk, CONNS connections each keeping DEPTH requests in flight
              (replies coalesce): requests/s
  bulk1/4     iperf3 with 1 and 4 streams: Gbit/s
For every wrk workload the proxy's CPU time (user + system of its whole
process group, from /proc) is divided by the requests served: CPU µs per
request, the proxy's cost on a node whose CPUs it shares with workloads.

Environment: BENCH_SECONDS (4), BENCH_ROUNDS (3), BENCH_CONNS (32),
BENCH_DEPTH (16), BENCH_JSON (where to write the medians as JSON),
BENCH_ONLY (comma-separated target names to keep).
"""
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HTTP = 18080
IPERF = 15201
SECONDS = int(os.environ.get("BENCH_SECONDS", "4"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNS = int(os.environ.get("BENCH_CONNS", "32"))
DEPTH = int(os.environ.get("BENCH_DEPTH", "16"))

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
]
HAPROXY = ("haproxy", "haproxy-splice")


class Bench:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kusp-peers-")
        self.procs = []
        self.groups = {}  # target name -> process group id of its proxy
        self.ports = {"direct": None}

    # -- processes -------------------------------------------------------
    def spawn(self, name, argv):
        log = open(os.path.join(self.dir, "stderr.log"), "a")
        p = subprocess.Popen(argv, shell=isinstance(argv, str), stdout=subprocess.DEVNULL,
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
  server {{ listen 127.0.0.1:{HTTP} backlog=4096; location / {{ return 200 "ok"; }} }} }}
""")
        self.spawn(None, ["nginx", "-c", conf, "-p", self.dir])
        self.spawn(None, ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF)])
        if not (wait_port(HTTP) and wait_port(IPERF)):
            sys.exit("backends did not start (see " + self.dir + "/stderr.log)")

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
  bind 127.0.0.1:PORT0
  default_backend http
backend http
  server s1 127.0.0.1:{HTTP}
frontend bulk
  bind 127.0.0.1:PORT1
  default_backend bulk
backend bulk
  server s1 127.0.0.1:{IPERF}
"""
            # splice-auto: recv/send until reads fill a buffer (rarely splices on
            # loopback); the second row forces splice both ways.
            for name, port, splice in [("haproxy", 28080, "option splice-auto"),
                                       ("haproxy-splice", 28086, "option splice-request\n  option splice-response")]:
                conf = base.replace("SPLICE", splice).replace("PORT0", str(port)).replace("PORT1", str(port + 1))
                self.spawn(name, ["haproxy", "-f", self.file(name + ".cfg", conf)])
                self.ports[name] = port
        stream = "/usr/lib/nginx/modules/ngx_stream_module.so"
        if os.path.exists(stream) and os.environ.get("BENCH_NGINX", "1") == "1":
            conf = self.file("stream.conf", f"""
load_module {stream};
daemon off; worker_processes auto; pid {self.dir}/stream.pid; error_log {self.dir}/stream.err;
events {{ worker_connections 20000; }}
stream {{
  server {{ listen 127.0.0.1:28082 backlog=4096; proxy_pass 127.0.0.1:{HTTP}; }}
  server {{ listen 127.0.0.1:28083; proxy_pass 127.0.0.1:{IPERF}; }}
}}
""")
            self.spawn("nginx-stream", ["nginx", "-c", conf, "-p", self.dir])
            self.ports["nginx-stream"] = 28082
        if shutil.which("socat") and os.environ.get("BENCH_SOCAT", "1") == "1":
            self.spawn("socat", f"socat TCP-LISTEN:28084,fork,reuseaddr,backlog=4096,bind=127.0.0.1 TCP:127.0.0.1:{HTTP}"
                                f" & exec socat TCP-LISTEN:28085,fork,reuseaddr,bind=127.0.0.1 TCP:127.0.0.1:{IPERF}")
            self.ports["socat"] = 28084
        for spec in extra:
            name, port, cmd = spec.split("=", 2)
            self.spawn(name, cmd)
            self.ports[name] = int(port)
        only = os.environ.get("BENCH_ONLY")
        for name, port in list(self.ports.items()):
            if only and name not in only.split(",") and name not in HAPROXY:
                del self.ports[name]
            elif port and not (wait_port(port) and wait_port(port + 1)):
                print(f"# {name} did not open ports {port} and {port + 1}: left out", file=sys.stderr)
                del self.ports[name]

    # -- workloads ---------------------------------------------------------
    def wrk(self, name, port, mode):
        url = f"http://127.0.0.1:{port or HTTP}/"
        argv = ["wrk", "-t1", f"-c{CONNS}", f"-d{SECONDS}s", "--latency"]
        if mode == "close":
            argv += ["-H", "Connection: close"]
        elif mode == "pipelined":
            argv += ["-s", self.file("pipeline.lua", PIPELINE.replace("DEPTH", str(DEPTH)))]
        before, host_before = self.cpu_seconds(name), self.host_cpu_seconds()
        out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=SECONDS + 30).stdout
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
        port = port + 1 if port else IPERF
        for attempt in range(3):
            out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(SECONDS),
                                  "-P", str(streams), "-J"], capture_output=True, text=True,
                                 timeout=SECONDS + 30).stdout
            try:
                return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
            except (ValueError, KeyError):
                time.sleep(1 + attempt)
        print(f"# iperf3 via port {port} failed three times: {out[-300:]}", file=sys.stderr)
        return float("nan")

    def run(self):
        samples = {n: {k: [] for k, _, _ in COLUMNS} | {"errors": []} for n in self.ports}
        for _ in range(ROUNDS):
            for name, port in self.ports.items():
                s = samples[name]
                for mode in ("keepalive", "close", "pipelined"):
                    rps, p99, cpu, errors = self.wrk(name, port, mode)
                    s[f"{mode}_rps"].append(rps)
                    s[f"{mode}_cpu_us"].append(cpu)
                    if mode == "keepalive":
                        s["keepalive_p99_us"].append(p99)
                        s["keepalive_host_us"].append(self.host_cpu * 1e6 / max(rps * SECONDS, 1))
                    s["errors"] += errors
                s["bulk1_gbps"].append(self.iperf(port, 1))
                s["bulk4_gbps"].append(self.iperf(port, 4))
        return {n: {k: statistics.median(s[k]) for k, _, _ in COLUMNS} | {"errors": s["errors"][:3]}
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


def wait_port(port, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def table(summary, value, title):
    print(f"\n{title}\n")
    print("| target | " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, s in summary.items():
        print(f"| {name} | " + " | ".join(value(name, k, lower) for k, _, lower in COLUMNS) + " |")


def report(summary):
    print(f"# medians of {ROUNDS} rounds × {SECONDS} s, {CONNS} connections, pipeline depth {DEPTH}, "
          f"{os.cpu_count()} CPUs")
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
    bench = Bench()
    try:
        bench.backends()
        bench.peers(sys.argv[1:])
        summary = bench.run()
        report(summary)
        out = os.environ.get("BENCH_JSON")
        if out:
            with open(out, "w") as f:
                json.dump(summary, f, indent=1)
    finally:
        bench.stop()


if __name__ == "__main__":
    main()
