#!/usr/bin/env python3
"""Scale: thousands of service ports × worker threads, one proxy process.

What it measures, for each cell of the grid N service ports × W worker
threads (default N in {1000, 10000}, W in {1, 16, 64}):

- N ClusterIP Services (one TCP port each, no nodePort, distinct clusterIPs
  from 10.96.0.10 up) and one EndpointSlice per Service (one ready endpoint,
  127.0.0.1 at the port of an echo server this script runs), written as YAML
  into a temp dir, 500 Services + 500 slices a file (well under the
  manifests source's 8 MiB per file and 64 MiB in all: ~50 KB per 100
  Services).
- The proxy runs as `--manifests DIR --iptables off --worker-threads W
  --bind-address 127.0.0.1 --log-format json`, with its own
  `--handover-socket` in the temp dir and its admin servers on free
  127.0.0.1 ports, under RLIMIT_NOFILE 20,000 (soft and hard).
- first full sync: seconds from spawn until every service port has a
  `listener_port` in `/debug/services` (polled every 50 ms, or twice the
  last fetch time if longer: the document of 10,000 ports takes ~0.5 s to
  fetch, see `debug_fetch_ms`, and is built on the thread that also runs
  the control loop, so polling harder would slow what it measures); the
  `took` of the first `synced` log line (the proxier's own time for that
  pass) with its `listening`/`pending` counts; and when the first `synced`
  line with every port listening was logged. A cell where not every port is served
  within `--sync-timeout` (60 s) is recorded as a miss (served < N) and
  the rest of the cell still runs on the ports that are served. The wait
  ends sooner on a plateau: no port added for `--stall` (15 s) while the
  proxier's last `synced` line reports ports pending (`--stall 0`: off).
- footprint once synced and idle: fds (`/proc/PID/fd`) and VmRSS, with the
  same binary's figures at 0 services and the same W subtracted to give
  fds per port.
- one changed EndpointSlice: one slice's endpoint moves to a second echo
  server (which tags its replies) by rewriting its file (rename over it).
  Reported: (a) the `took` of the next `synced` log line with
  `endpoints_changed` 1, and when it came after the write (this includes
  the manifests source's 0.5 s poll, a re-read and a re-parse of every
  file); (b) end to end until `/debug/services` shows the new endpoint
  (same 0.5 s poll included, plus the document fetch), and until a new
  connection through the proxy reaches the new backend (probed every
  10 ms).
- sample: a line echoed through ~50 random served ports.
- hand-over: 1,000 connections through the proxy (spread over served
  ports), each having echoed a line, are held; a second process with the
  same flags and `--handover-socket` is started. Reported: from its spawn
  until its `hand-over: serving` log line (it inherits the admin listeners
  on the same ports, so the log line is the signal, not an admin poll),
  until its `hand-over: connections carried over` line, and until the old
  process exits; then every held connection must echo a line again, and
  the successor's `/debug/services` is read again.

Output: a markdown table on stdout (progress on stderr), JSON with
`--json FILE`. All traffic is on 127.0.0.1; every wait is bounded; proxies
and temp dirs are removed on exit, failure or signal (the proxies also get
SIGKILL if this script dies: PR_SET_PDEATHSIG).

Run from the repository root (python3, stdlib only, Linux; needs a hard fd
limit of at least 20,000 or root):

    cargo build --release && benches/scale.py
    benches/scale.py --binary /path/to/kube-userspace-proxy --ports 1000 \\
        --workers 1,16 --json /tmp/scale.json

Flags (or env): --ports (SCALE_PORTS), --workers (SCALE_WORKERS), --binary
(KUSP_BIN, default target/release/kube-userspace-proxy), --sync-timeout,
--conns, --sample, --nofile, --seed, --keep (keep temp dirs).
"""
import argparse
import atexit
import ctypes
import datetime
import errno
import http.client
import ipaddress
import json
import os
import platform
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

PROCS = []  # every proxy we started (Popen), killed at exit
DIRS = []  # temp dirs, removed at exit unless --keep
KEEP = False
NAMESPACE = "scale"


def log(msg):
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- cleanup


def kill(p):
    if p.poll() is None:
        try:
            p.kill()
        except OSError:
            pass
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        pass


def cleanup():
    for p in PROCS:
        kill(p)
    PROCS.clear()
    for d in DIRS:
        if KEEP:
            log(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    DIRS.clear()


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------- helpers

_DUR = re.compile(r"^([0-9.]+)(ns|µs|us|ms|s)$")
_SCALE_MS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1000.0}


def duration_ms(s):
    """Rust's Debug of a Duration ("97.201µs", "1.2ms", "3.4s") in ms."""
    m = _DUR.match(str(s))
    return round(float(m.group(1)) * _SCALE_MS[m.group(2)], 3) if m else None


def log_ts(s):
    """The JSON log's UTC timestamp as Unix seconds."""
    s = re.sub(r"(\.\d{6})\d+", r"\1", s.replace("Z", "+00:00"))
    return datetime.datetime.fromisoformat(s).timestamp()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def threads(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def nfds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def debug_services(port, timeout=20):
    """`/debug/services`' service list, or None; and the fetch time in ms."""
    t = time.monotonic()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("GET", "/debug/services")
        r = c.getresponse()
        body = r.read()
        c.close()
        if r.status != 200:
            return None, (time.monotonic() - t) * 1000
        return json.loads(body)["services"], (time.monotonic() - t) * 1000
    except (OSError, ValueError, http.client.HTTPException):
        return None, (time.monotonic() - t) * 1000


def served_map(services):
    """service name -> listener port, for ours that have one."""
    return {
        s["name"]: s["listener_port"]
        for s in services
        if s.get("namespace") == NAMESPACE and s.get("listener_port")
    }


def ms(t):
    return None if t is None else round(t * 1000, 1)


# ---------------------------------------------------------------- echo backend


class Echo(threading.Thread):
    """Two echo listeners on 127.0.0.1 in one selector thread: `plain`
    echoes what it reads, `tagged` prefixes each read with b"B "."""

    def __init__(self):
        super().__init__(daemon=True, name="echo")
        self.sel = selectors.DefaultSelector()
        self.ports = {}
        self.accepted = 0
        for name, tag in (("plain", b""), ("tagged", b"B ")):
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", 0))
            ls.listen(4096)
            ls.setblocking(False)
            self.sel.register(ls, selectors.EVENT_READ, ("listen", tag))
            self.ports[name] = ls.getsockname()[1]

    def run(self):
        while True:
            for key, ev in self.sel.select(1.0):
                kind, st = key.data
                if kind == "listen":
                    while True:
                        try:
                            c, _ = key.fileobj.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:  # EMFILE and such: try again later
                            break
                        c.setblocking(False)
                        self.accepted += 1
                        self.sel.register(c, selectors.EVENT_READ, ("conn", {"tag": st, "out": b""}))
                    continue
                c = key.fileobj
                try:
                    if ev & selectors.EVENT_READ:
                        d = c.recv(65536)
                        if not d:
                            raise ConnectionError("eof")
                        st["out"] += st["tag"] + d
                    if st["out"]:
                        n = c.send(st["out"])
                        st["out"] = st["out"][n:]
                    want = selectors.EVENT_READ | (selectors.EVENT_WRITE if st["out"] else 0)
                    if want != key.events:
                        self.sel.modify(c, want, key.data)
                except BlockingIOError:
                    self.sel.modify(c, selectors.EVENT_READ | selectors.EVENT_WRITE, key.data)
                except OSError:
                    self.sel.unregister(c)
                    c.close()


# ---------------------------------------------------------------- clients


class Probe:
    """One TCP client: connect (unless given a socket), send a line, read
    one line back. `result` is "ok", "mismatch" or what failed."""

    def __init__(self, port, line, sock=None):
        self.port, self.line, self.sock = port, line, sock
        self.result, self.reply, self.tagged = None, b"", False


def roundtrips(probes, timeout):
    """Drives every probe at once until all are done or `timeout` s pass."""
    sel = selectors.DefaultSelector()
    pending = 0
    for p in probes:
        p.result, p.reply = None, b""
        if p.sock is None:
            s = socket.socket()
            s.setblocking(False)
            rc = s.connect_ex(("127.0.0.1", p.port))
            if rc not in (0, errno.EINPROGRESS):
                s.close()
                p.result = f"connect: {os.strerror(rc)}"
                continue
            p.sock, p.stage = s, "connect"
        else:
            p.stage = "send"
        sel.register(p.sock, selectors.EVENT_WRITE, p)
        pending += 1
    deadline = time.monotonic() + timeout
    while pending and (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(min(left, 0.5)):
            p = key.data
            s = p.sock
            try:
                if p.stage == "connect":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err))
                    p.stage = "send"
                if p.stage == "send":
                    s.send(p.line)
                    p.stage = "read"
                    sel.modify(s, selectors.EVENT_READ, p)
                    continue
                d = s.recv(4096)
                if not d:
                    raise ConnectionError("closed by the peer")
                p.reply += d
                if b"\n" in p.reply:
                    p.tagged = p.reply.startswith(b"B ")
                    p.result = "ok" if p.reply in (p.line, b"B " + p.line) else "mismatch"
                    sel.unregister(s)
                    pending -= 1
            except OSError as e:
                p.result = f"{p.stage}: {e.strerror or e}"
                sel.unregister(s)
                pending -= 1
    for key in list(sel.get_map().values()):
        key.data.result = f"timeout ({key.data.stage})"
        sel.unregister(key.fileobj)
    sel.close()
    return probes


def tally(probes):
    ok = sum(p.result == "ok" for p in probes)
    errors = {}
    for p in probes:
        if p.result != "ok":
            errors[p.result] = errors.get(p.result, 0) + 1
    return ok, errors


def close_all(probes):
    for p in probes:
        if p.sock is not None:
            try:
                p.sock.close()
            except OSError:
                pass
            p.sock = None


# ---------------------------------------------------------------- proxy process


KEEP_MESSAGES = {"synced", "manifests loaded", "manifests changed", "connection limit",
                 "RLIMIT_NOFILE raised to the hard limit", "hand-over socket ready: a new process started with it takes over"}


class Proxy:
    """A proxy process and a reader of its JSON log (stderr). Interesting
    lines are parsed and kept; every line is counted by level and message,
    with the first of each warning or error kept as an example."""

    def __init__(self, cmd, nofile, name):
        self.name = name
        self.events = []
        self.counts = {}
        self.examples = {}
        self.lines = 0
        self.eof = False
        self.cond = threading.Condition()

        def preexec():
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            try:  # die with this script
                ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            except Exception:
                pass

        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, preexec_fn=preexec, env=env,
                                     start_new_session=True)
        PROCS.append(self.proc)
        self.pid = self.proc.pid
        threading.Thread(target=self._read, daemon=True, name=f"log-{name}").start()

    def _read(self):
        for raw in self.proc.stderr:
            rx = time.time()
            line = raw.decode("utf-8", "replace")
            i = line.find('"level":"')
            level = line[i + 9:line.find('"', i + 9)] if i >= 0 else "?"
            i = line.find('"message":"')
            msg = line[i + 11:line.find('"', i + 11)] if i >= 0 else line.strip()[:120]
            keep = msg in KEEP_MESSAGES or "hand" in msg or level == "ERROR"
            ev = None
            if keep:
                try:
                    j = json.loads(line)
                    f = j.get("fields", {})
                    ev = {"msg": f.get("message", msg), "level": level, "fields": f,
                          "ts": log_ts(j["timestamp"]), "rx": rx}
                except (ValueError, KeyError):
                    ev = {"msg": msg, "level": level, "fields": {}, "ts": rx, "rx": rx}
            with self.cond:
                self.lines += 1
                k = f"{level} {msg}"
                self.counts[k] = self.counts.get(k, 0) + 1
                if level in ("WARN", "ERROR") and k not in self.examples:
                    self.examples[k] = line.strip()[:400]
                if ev:
                    self.events.append(ev)
                    self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_event(self, pred, timeout, start=0):
        """First kept event (from index `start`) matching `pred`, or None."""
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.events):
                    if pred(self.events[i]):
                        return self.events[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    return None
                self.cond.wait(min(left, 0.5))

    def n_events(self):
        with self.cond:
            return len(self.events)

    def warnings(self):
        with self.cond:
            return {k: v for k, v in self.counts.items() if not k.startswith("INFO ")}, dict(self.examples)


def proxy_cmd(binary, mdir, workers, sock, metrics, healthz):
    return [binary, "--manifests", mdir, "--iptables", "off", "--worker-threads", str(workers),
            "--handover-socket", sock, "--bind-address", "127.0.0.1",
            "--metrics-bind-address", f"127.0.0.1:{metrics}",
            "--healthz-bind-address", f"127.0.0.1:{healthz}",
            "--log-format", "json", "--log-level", "info"]


# ---------------------------------------------------------------- manifests


def service_doc(i):
    ip = ipaddress.IPv4Address("10.96.0.10") + i
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: s{i:05d}, namespace: {NAMESPACE}}}\n"
            f"spec:\n  type: ClusterIP\n  clusterIP: {ip}\n"
            f"  ports: [{{name: tcp, port: 80, protocol: TCP}}]\n")


def slice_doc(i, port):
    return (f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
            f"metadata: {{name: s{i:05d}-a, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: s{i:05d}}}}}\n"
            f"addressType: IPv4\nports: [{{name: tcp, port: {port}, protocol: TCP}}]\n"
            f"endpoints: [{{addresses: [\"127.0.0.1\"], conditions: {{ready: true}}}}]\n")


class Manifests:
    def __init__(self, mdir, n, port, per_file):
        self.dir, self.n, self.per_file = mdir, n, per_file
        self.ports = [port] * n
        self.bytes = 0
        self.files = 0
        for f in range(0, n, per_file):
            self.bytes += self.write(f // per_file)
            self.files += 1

    def path(self, f):
        return os.path.join(self.dir, f"services-{f:03d}.yaml")

    def write(self, f):
        lo, hi = f * self.per_file, min(self.n, (f + 1) * self.per_file)
        text = "---\n".join(service_doc(i) + "---\n" + slice_doc(i, self.ports[i]) for i in range(lo, hi))
        tmp = self.path(f) + ".tmp"  # not a manifest name: never read half-written
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, self.path(f))
        return len(text)

    def change(self, i, port):
        self.ports[i] = port
        return self.write(i // self.per_file)


# ---------------------------------------------------------------- one cell


def zero_baseline(args, workers, echo):
    """fds and RSS of the binary with no services at all, same W."""
    work = tempfile.mkdtemp(prefix=f"kusp-scale-0x{workers}-")
    DIRS.append(work)
    mdir = os.path.join(work, "m")
    os.makedirs(mdir)
    p = Proxy(proxy_cmd(args.binary, mdir, workers, os.path.join(work, "handover.sock"),
                        free_port(), free_port()), args.nofile, f"zero-{workers}")
    try:
        if not p.wait_event(lambda e: e["msg"] == "synced", 15):
            return {"error": "no synced line within 15 s"}
        time.sleep(args.settle)
        return {"fds": nfds(p.pid), "rss_kib": rss_kib(p.pid), "threads": threads(p.pid)}
    finally:
        kill(p.proc)
        if not KEEP:
            shutil.rmtree(work, ignore_errors=True)
            DIRS.remove(work)


def run_cell(args, n, workers, echo, zero):
    rng = random.Random(args.seed * 100003 + n * 101 + workers)
    cell = {"ports": n, "workers": workers, "notes": []}
    work = tempfile.mkdtemp(prefix=f"kusp-scale-{n}x{workers}-")
    DIRS.append(work)
    mdir = os.path.join(work, "m")
    os.makedirs(mdir)
    t = time.monotonic()
    man = Manifests(mdir, n, echo.ports["plain"], args.per_file)
    cell["manifest_files"] = man.files
    cell["manifest_bytes"] = man.bytes
    cell["manifest_write_s"] = round(time.monotonic() - t, 2)
    sock = os.path.join(work, "handover.sock")
    metrics, healthz = free_port(), free_port()
    cmd = proxy_cmd(args.binary, mdir, workers, sock, metrics, healthz)
    procs = []
    held = []
    try:
        old = Proxy(cmd, args.nofile, f"{n}x{workers}")
        procs.append(old)
        # ---- first full sync
        deadline = old.t0 + args.sync_timeout
        served, fetches, full_at, grew_at, stalled = {}, [], None, time.time(), False
        while True:
            svcs, fetch_ms = debug_services(metrics)
            if svcs is not None:
                fetches.append(fetch_ms)
                now = served_map(svcs)
                if len(now) > len(served):
                    grew_at = time.time()
                served = now
                if len(served) >= n:
                    full_at = time.time() - old.t0
                    break
            if old.proc.poll() is not None:
                cell["notes"].append(f"proxy exited with {old.proc.returncode} before serving every port")
                break
            if time.time() > deadline:
                break
            # A plateau: the proxier has finished passes that left ports
            # pending, and no port was added for --stall s.
            if args.stall and time.time() - grew_at > args.stall:
                last = [e for e in old.events[-50:] if e["msg"] == "synced"]
                if last and last[-1]["fields"].get("pending"):
                    stalled = True
                    break
            # The document is built on the thread that also runs the control
            # loop: leave it at least twice the fetch time between polls.
            time.sleep(max(args.poll, 2 * fetch_ms / 1000))
        cell["served"] = len(served)
        cell["missed"] = n - len(served)
        cell["first_full_sync_s"] = None if full_at is None else round(full_at, 3)
        cell["debug_fetch_ms"] = round(max(fetches), 1) if fetches else None
        cell["debug_polls"] = len(fetches)
        cell["served_last_grew_at_s"] = round(grew_at - old.t0, 3)
        if full_at is None:
            why = (f"no port added for {args.stall:.0f} s while the proxier reports ports pending" if stalled
                   else f"timeout {args.sync_timeout:.0f} s")
            cell["notes"].append(f"MISS: {n - len(served)} of {n} ports not served "
                                 f"({why}; last port added {grew_at - old.t0:.1f} s after spawn)")
        first = old.wait_event(lambda e: e["msg"] == "synced", 5)
        if first:
            f = first["fields"]
            cell["first_synced"] = {"at_s": round(first["ts"] - old.t0, 3), "took_ms": duration_ms(f.get("took")),
                                    "listening": f.get("listening"), "pending": f.get("pending"),
                                    "services": f.get("services")}
        full = old.wait_event(lambda e: e["msg"] == "synced" and e["fields"].get("listening") == n, 0.1)
        if full:
            cell["all_listening_synced_at_s"] = round(full["ts"] - old.t0, 3)
        loaded = old.wait_event(lambda e: e["msg"] == "manifests loaded", 0.1)
        if loaded:
            cell["manifests_loaded_at_s"] = round(loaded["ts"] - old.t0, 3)
        cell["synced_lines"] = old.counts.get("INFO synced", 0)
        if old.proc.poll() is not None:
            return cell
        # ---- idle footprint
        time.sleep(args.settle)
        fds, rss = nfds(old.pid), rss_kib(old.pid)
        cell["fds"], cell["rss_kib"], cell["threads"] = fds, rss, threads(old.pid)
        cell["fds_per_port"] = round(fds / n, 2) if fds else None
        if fds and served:
            cell["fds_per_served_port_net"] = round((fds - ((zero or {}).get("fds") or 0)) / len(served), 2)
        if fds and zero and zero.get("fds") is not None:
            cell["fds_zero"] = zero["fds"]
            cell["rss_zero_kib"] = zero["rss_kib"]
            cell["fds_per_port_net"] = round((fds - zero["fds"]) / n, 2)
            cell["rss_per_port_bytes"] = round((rss - zero["rss_kib"]) * 1024 / n) if rss else None
        if not served:
            cell["notes"].append("no port served: nothing more to measure")
            return cell
        names = sorted(served)
        # ---- sample of ports
        sample = [Probe(served[s], f"sample {s}\n".encode()) for s in rng.sample(names, min(args.sample, len(names)))]
        roundtrips(sample, 10)
        ok, errs = tally(sample)
        close_all(sample)
        cell["sample"] = {"ok": ok, "of": len(sample), "errors": errs}
        # ---- one changed EndpointSlice
        k = rng.choice(names)
        kport = served[k]
        new_ep = f"127.0.0.1:{echo.ports['tagged']}"
        start = old.n_events()
        t_write = time.time()
        man.change(int(k[1:]), echo.ports["tagged"])
        t_write_done = time.time()
        data_at = [None]
        stop_probe = threading.Event()

        def data_probe():
            end = time.monotonic() + args.change_timeout
            while not stop_probe.is_set() and time.monotonic() < end:
                p = roundtrips([Probe(kport, b"probe\n")], 2)[0]
                close_all([p])
                if p.result == "ok" and p.tagged:
                    data_at[0] = time.time()
                    return
                time.sleep(0.01)

        th = threading.Thread(target=data_probe, daemon=True)
        th.start()
        debug_at = None
        end = time.monotonic() + args.change_timeout
        while time.monotonic() < end:
            svcs, fetch_ms = debug_services(metrics)
            if svcs is not None:
                s = next((s for s in svcs if s["namespace"] == NAMESPACE and s["name"] == k), None)
                if s and any(e["address"] == new_ep for e in s["endpoints"]):
                    debug_at = time.time()
                    break
            time.sleep(max(args.poll, 2 * fetch_ms / 1000))
        th.join(args.change_timeout + 3)
        stop_probe.set()
        ch = {"service": k, "write_ms": round((t_write_done - t_write) * 1000, 1),
              "debug_services_ms": ms(None if debug_at is None else debug_at - t_write),
              "data_path_ms": ms(None if data_at[0] is None else data_at[0] - t_write)}
        mc = old.wait_event(lambda e: e["msg"] == "manifests changed" and e["ts"] >= t_write, 2, start)
        if mc:
            ch["manifests_changed_at_ms"] = ms(mc["ts"] - t_write)
        sy = old.wait_event(lambda e: e["msg"] == "synced" and e["fields"].get("endpoints_changed") == 1
                            and e["ts"] >= t_write, 2, start)
        if sy:
            ch["synced_took_ms"] = duration_ms(sy["fields"].get("took"))
            ch["synced_at_ms"] = ms(sy["ts"] - t_write)
        else:
            cell["notes"].append("no synced line with endpoints_changed 1 after the slice change")
        if debug_at is None:
            cell["notes"].append(f"changed endpoint not in /debug/services within {args.change_timeout:.0f} s")
        cell["change"] = ch
        # ---- hand-over with live connections
        others = [s for s in names if s != k]
        if not others:
            return cell
        spread = rng.sample(others, min(args.conns, len(others)))
        held = [Probe(served[spread[i % len(spread)]], f"held {i}\n".encode()) for i in range(args.conns)]
        roundtrips(held, 10)
        ok, errs = tally(held)
        ho = {"opened_ok": ok, "opened": len(held), "open_errors": errs, "ports_used": len(spread)}
        live = [p for p in held if p.result == "ok"]
        cell["fds_with_conns"] = nfds(old.pid)
        new = Proxy(cmd, args.nofile, f"{n}x{workers}-successor")
        procs.append(new)
        t1 = new.t0
        recv = new.wait_event(lambda e: e["msg"].startswith("hand-over: listeners received"), args.sync_timeout)
        srv = new.wait_event(lambda e: e["msg"].startswith("hand-over: serving"), args.sync_timeout)
        if recv:
            ho["listeners_received_ms"] = ms(recv["ts"] - t1)
            ho["service_ports_received"] = recv["fields"].get("service_ports")
        if srv:
            ho["serving_ms"] = ms(srv["ts"] - t1)
            ho["serving_took_ms"] = duration_ms(srv["fields"].get("took"))
            ho["successor_listening"] = srv["fields"].get("listening")
        else:
            cell["notes"].append("successor never logged `hand-over: serving`")
            try:  # its log ended: it is exiting, or wedged
                new.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
            if new.proc.poll() is not None:
                cell["notes"].append(f"successor exited with {new.proc.returncode}")
        loaded = new.wait_event(lambda e: e["msg"] == "manifests loaded", 0.1)
        if loaded:
            ho["successor_manifests_loaded_ms"] = ms(loaded["ts"] - t1)
        exit_at = None
        end = time.monotonic() + args.exit_timeout
        while time.monotonic() < end:
            if old.proc.poll() is not None:
                exit_at = time.time()
                break
            if not srv and new.proc.poll() is not None:
                break  # no successor: the old one serves on, as designed
            time.sleep(0.005)
        ho["old_exit_ms"] = ms(None if exit_at is None else exit_at - t1)
        ho["old_exit_code"] = old.proc.poll()
        if exit_at is None and srv:
            cell["notes"].append(f"old process still running {args.exit_timeout:.0f} s after the successor started")
        elif exit_at is None:
            cell["notes"].append("old process kept serving (no successor took over)")
        car = new.wait_event(lambda e: e["msg"].startswith("hand-over: connections carried over"), 5)
        if car:
            ho["carried_over"] = car["fields"].get("connections")
            ho["carried_over_ms"] = ms(car["ts"] - t1)
            ho["carry_took_ms"] = duration_ms(car["fields"].get("took"))
        sent = old.wait_event(lambda e: e["msg"].startswith("hand-over: connections sent"), 1)
        if sent:
            ho["old_sent"] = sent["fields"].get("sent")
            ho["old_not_parked"] = sent["fields"].get("not_parked")
            ho["old_send_took_ms"] = duration_ms(sent["fields"].get("took"))
        for p in live:
            p.line = p.line.replace(b"held", b"after")
        roundtrips(live, 10)
        ok, errs = tally(live)
        ho["echo_after_ok"], ho["echo_after_of"], ho["echo_after_errors"] = ok, len(live), errs
        if ok < len(live):
            cell["notes"].append(f"{len(live) - ok} of {len(live)} held connections lost in the hand-over")
        if new.proc.poll() is None:
            svcs, _ = debug_services(metrics)
            ho["successor_served"] = None if svcs is None else len(served_map(svcs))
            ho["successor_fds"], ho["successor_rss_kib"] = nfds(new.pid), rss_kib(new.pid)
            after = served_map(svcs or [])
            pick = rng.sample(sorted(after), min(args.sample, len(after)))
            s2 = [Probe(after[s], f"again {s}\n".encode()) for s in pick]
            roundtrips(s2, 10)
            ok, errs = tally(s2)
            close_all(s2)
            ho["sample_after"] = {"ok": ok, "of": len(s2), "errors": errs}
        cell["handover"] = ho
        return cell
    except Exception as e:  # one cell failing never stops the grid
        cell["notes"].append(f"cell failed: {type(e).__name__}: {e}")
        return cell
    finally:
        close_all(held)
        for i, p in enumerate(procs):
            w, ex = p.warnings()
            cell.setdefault("log", {})[("proxy", "successor")[i]] = {"lines": p.lines, "not_info": w, "examples": ex}
            kill(p.proc)
        if not KEEP:
            shutil.rmtree(work, ignore_errors=True)
            DIRS.remove(work)


# ---------------------------------------------------------------- output


def fmt(v, nd=0):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(results):
    out = []
    out.append("| N ports | W | served | first full sync s (poll) | all listening in `synced` log at s | first `synced` at s / took ms | listening / pending in it "
               "| fds | fds/N | fds per served port, net of 0 services | RSS MiB | threads | sample echo |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in results["cells"]:
        fs = c.get("first_synced", {})
        sm = c.get("sample", {})
        served = fmt(c.get("served"))
        if c.get("missed"):
            served = f"**{served}** (miss {c['missed']:,})"
        out.append("| " + " | ".join([
            fmt(c["ports"]), fmt(c["workers"]), served,
            fmt(c.get("first_full_sync_s"), 2) if c.get("first_full_sync_s") is not None else "**never**",
            fmt(c.get("all_listening_synced_at_s"), 2),
            f"{fmt(fs.get('at_s'), 2)} / {fmt(fs.get('took_ms'), 1)}",
            f"{fmt(fs.get('listening'))} / {fmt(fs.get('pending'))}",
            fmt(c.get("fds")),
            fmt(c.get("fds_per_port"), 2), fmt(c.get("fds_per_served_port_net"), 2),
            fmt(None if c.get("rss_kib") is None else c["rss_kib"] / 1024, 1),
            fmt(c.get("threads")),
            f"{sm.get('ok', '–')}/{sm.get('of', '–')}",
        ]) + " |")
    out.append("")
    out.append("| N ports | W | slice change: `synced` took ms | `synced` after write ms | /debug/services shows it ms "
               "| new conn reaches it ms | held conns | successor: listeners received / serving ms | conns carried (ms) | old exits ms "
               "| held conns echo after | successor served |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in results["cells"]:
        ch = c.get("change", {})
        ho = c.get("handover", {})
        carried = "–" if ho.get("carried_over") is None else f"{fmt(ho['carried_over'])} ({fmt(ho.get('carried_over_ms'), 0)})"
        out.append("| " + " | ".join([
            fmt(c["ports"]), fmt(c["workers"]),
            fmt(ch.get("synced_took_ms"), 2), fmt(ch.get("synced_at_ms"), 0),
            fmt(ch.get("debug_services_ms"), 0), fmt(ch.get("data_path_ms"), 0),
            f"{ho.get('opened_ok', '–')}/{ho.get('opened', '–')}",
            f"{fmt(ho.get('listeners_received_ms'), 0)} / {fmt(ho.get('serving_ms'), 0)}",
            carried, fmt(ho.get("old_exit_ms"), 0),
            f"{ho.get('echo_after_ok', '–')}/{ho.get('echo_after_of', '–')}",
            fmt(ho.get("successor_served")),
        ]) + " |")
    notes = [(c["ports"], c["workers"], n) for c in results["cells"] for n in c["notes"]]
    if notes:
        out.append("")
        out.extend(f"- {n:,} × {w}: {t}" for n, w, t in notes)
    zero = results.get("zero", {})
    if zero:
        out.append("")
        out.append("0 services: " + "; ".join(
            f"W={w}: {z.get('fds', '–')} fds, {fmt(None if z.get('rss_kib') is None else z['rss_kib'] / 1024, 1)} MiB"
            for w, z in zero.items()))
    return "\n".join(out)


# ---------------------------------------------------------------- main


def main():
    global KEEP
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ports", default=os.environ.get("SCALE_PORTS", "1000,10000"),
                    help="comma-separated service port counts N (env SCALE_PORTS)")
    ap.add_argument("--workers", default=os.environ.get("SCALE_WORKERS", "1,16,64"),
                    help="comma-separated --worker-threads values W (env SCALE_WORKERS)")
    ap.add_argument("--binary", default=os.environ.get("KUSP_BIN", "target/release/kube-userspace-proxy"),
                    help="proxy binary (env KUSP_BIN)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--sync-timeout", type=float, default=60, help="seconds to wait for every port to be served")
    ap.add_argument("--stall", type=float, default=15,
                    help="stop waiting for the full sync after this many seconds without a new port served "
                         "while the last `synced` line reports ports pending (0: wait the whole --sync-timeout)")
    ap.add_argument("--change-timeout", type=float, default=10, help="seconds to wait for a slice change")
    ap.add_argument("--exit-timeout", type=float, default=30, help="seconds to wait for the old process to exit")
    ap.add_argument("--conns", type=int, default=1000, help="connections held through the hand-over")
    ap.add_argument("--sample", type=int, default=50, help="ports probed with an echo")
    ap.add_argument("--per-file", type=int, default=500, help="Services (+ as many slices) per manifest file")
    ap.add_argument("--nofile", type=int, default=20000, help="RLIMIT_NOFILE of the proxy (soft and hard)")
    ap.add_argument("--poll", type=float, default=0.05, help="seconds between /debug/services polls")
    ap.add_argument("--settle", type=float, default=1.0, help="idle seconds before reading fds and RSS")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (manifests)")
    args = ap.parse_args()
    KEEP = args.keep
    ports = [int(x) for x in args.ports.split(",") if x.strip()]
    workers = [int(x) for x in args.workers.split(",") if x.strip()]
    if not os.access(args.binary, os.X_OK):
        raise SystemExit(f"{args.binary}: not an executable (cargo build --release, or --binary PATH)")
    atexit.register(cleanup)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    # Our own fds: held clients + the echo server's side of each.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < args.nofile:
        try:  # the proxies inherit it: it must be raisable here
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
        except (ValueError, OSError) as e:
            raise SystemExit(f"cannot raise RLIMIT_NOFILE to {args.nofile} (hard limit {hard}): {e}; "
                             f"use --nofile {hard} or raise the hard limit")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    echo = Echo()
    echo.start()
    results = {
        "binary": os.path.abspath(args.binary),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "nofile": args.nofile, "sync_timeout_s": args.sync_timeout, "conns": args.conns, "sample": args.sample,
        "echo_ports": echo.ports, "zero": {}, "cells": [],
    }
    started = time.monotonic()
    for w in workers:
        try:
            results["zero"][w] = zero_baseline(args, w, echo)
        except Exception as e:
            results["zero"][w] = {"error": f"{type(e).__name__}: {e}"}
        log(f"0 services, W={w}: {results['zero'][w]}")
    for n in ports:
        for w in workers:
            log(f"cell N={n} W={w} ...")
            t = time.monotonic()
            c = run_cell(args, n, w, echo, results["zero"].get(w))
            c["cell_s"] = round(time.monotonic() - t, 1)
            results["cells"].append(c)
            log(f"cell N={n} W={w}: served {c.get('served')}/{n}, full sync "
                f"{c.get('first_full_sync_s')} s, {c['cell_s']} s; " + "; ".join(c["notes"]))
            if args.json:  # partial results survive a later failure
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    results["total_s"] = round(time.monotonic() - started, 1)
    print(f"# benches/scale.py: {os.path.basename(args.binary)}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"RLIMIT_NOFILE {args.nofile}, {args.conns} held conns, {results['total_s']} s in all\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
