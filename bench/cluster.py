#!/usr/bin/env python3
"""Cluster benchmark (issue 12): cross-node event latency and throughput, and lease failover, on
three supervisor nodes over one NATS server and over three, next to NATS JetStream itself measured
on the same servers in the same run (bench/natsbench.rs). Release binaries, loopback only.

    bench/cluster.sh                          # builds, then runs this
    BENCH_NO_BUILD=1 bench/cluster.sh         # the binaries already built
    CLUSTER_LATENCY=100 CLUSTER_BURST=2000 CLUSTER_FAILOVERS=3 python3 bench/cluster.py   # quicker

For each topology (1 server, 3 servers in a NATS cluster), in a temporary directory:
- nodes a, b, c, each a supervisor root whose config joins the cluster (every server listed, so the
  stream and the buckets have as many replicas as servers, up to 3);
- latency: a worker on node a emits NEW_GAMES_AVAILABLE every 25 ms with its emit time (unix µs)
  in the payload; `events -f --json` on node c (and on a, for the same-node figure) is read here and
  each event's arrival stamped with this script's clock (all on one machine: one clock);
- throughput: a worker on node a emits a burst as fast as it can; from the first event's emit time
  to the arrival of the last on node c, every one of them checked to arrive exactly once on b and c;
- failover: queue_populator (cluster-scoped) on all three nodes, the lease holder's supervisor
  SIGKILLed, and the time from the kill until another node's master_loop.log says "acquired";
  the killed node is restarted between rounds, and each kill waits a random 1-2 s first, so that
  kills fall anywhere in the renewal period;
- NATS itself: bench/natsbench.rs on the same servers, same payload size as the supervisor's
  envelope, same stream settings.

Writes bench/results/cluster-latest.json and prints a markdown table. Bounded (CLUSTER_TIMEOUT,
default 480 s); everything it starts (servers, supervisors, followers) is stopped and its temporary
directory removed, also on failure or SIGTERM/SIGINT.
"""

import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
if not TARGET.is_absolute():
    TARGET = REPO / TARGET
BIN = TARGET / "release"
SUP = str(BIN / "ringrift-supervisor")
WORKER = str(BIN / "ringrift-worker")
NATSBENCH = str(BIN / "examples" / "natsbench")
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"

LATENCY = int(os.environ.get("CLUSTER_LATENCY", "200"))
BURST = int(os.environ.get("CLUSTER_BURST", "5000"))
FAILOVERS = int(os.environ.get("CLUSTER_FAILOVERS", "5"))
TOPOLOGIES = [int(n) for n in os.environ.get("CLUSTER_SERVERS", "1,3").split(",")]  # the table wants both
LEASE_TTL = 2.0
DEADLINE = time.monotonic() + float(os.environ.get("CLUSTER_TIMEOUT", "480"))
NODES = ("node-a", "node-b", "node-c")


class Timeout(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait(cond, what, secs=60.0):
    end = min(DEADLINE, time.monotonic() + secs)
    while not cond():
        if time.monotonic() > end:
            raise Timeout(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, p):
    """Nearest-rank percentile."""
    v = sorted(values)
    if not v:
        return None
    k = max(1, min(len(v), -(-len(v) * p // 100)))
    return v[int(k) - 1]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Run:
    """Everything this run started, for the cleanup."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.servers = []     # Popen of nats-server
        self.followers = []   # Popen of `events -f`
        self.roots = []       # supervisor roots
        self.killed = set()   # roots whose supervisor we SIGKILLed and did not restart

    def cleanup(self):
        for p in self.followers:
            stop_proc(p, signal.SIGTERM, 5)
        self.followers.clear()
        for root in self.roots:
            stop_root(root, root in self.killed)
        self.roots.clear()
        self.killed.clear()
        for p in self.servers:
            stop_proc(p, signal.SIGTERM, 10)
        self.servers.clear()


def stop_proc(p, sig, secs):
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout=secs)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        except ProcessLookupError:
            pass


def sup(root, *args, check=True, timeout=60):
    r = subprocess.run([SUP, "--root", str(root), *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{root.name}: {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r.stdout


def supervisor_pid(root):
    try:
        return int((root / "run" / "supervisor.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def stop_root(root, killed):
    """Stops a root's supervisor; one we SIGKILLed is started and stopped again, so that it removes
    what the killed one left (its cgroup subtree)."""
    try:
        if killed:
            sup(root, "start", "napper", check=False, timeout=30)
        pid = supervisor_pid(root)
        sup(root, "shutdown", "--timeout", "20", check=False, timeout=40)
        if pid and alive(pid):
            t = time.monotonic() + 20
            while alive(pid) and time.monotonic() < t:
                time.sleep(0.05)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    except Exception as e:  # cleanup goes on with the others
        log(f"cleanup of {root}: {e}")


# ---------------------------------------------------------------------------------------------
# NATS servers


def start_servers(run, n, where):
    """n nats-server processes (n = 1, or 3 in one NATS cluster) on free loopback ports; returns
    their client URLs once every one is healthy (and, for three, a meta leader is elected)."""
    ports = [(free_port(), free_port(), free_port()) for _ in range(n)]
    urls = []
    for i, (client, http, route) in enumerate(ports):
        name = f"s{i + 1}"
        store = where / name
        store.mkdir(parents=True)
        conf = [
            f"server_name: {name}",
            f"listen: 127.0.0.1:{client}",
            f"http: 127.0.0.1:{http}",
            f'jetstream {{ store_dir: "{store}" }}',
        ]
        if n > 1:
            routes = ", ".join(f"nats-route://127.0.0.1:{r}" for _, _, r in ports)
            conf.append(f"cluster {{ name: bench, listen: 127.0.0.1:{route}, routes: [{routes}] }}")
        cfile = where / f"{name}.conf"
        cfile.write_text("\n".join(conf) + "\n")
        p = subprocess.Popen([NATS_SERVER, "-c", str(cfile)], stdin=subprocess.DEVNULL,
                             stdout=open(where / f"{name}.log", "wb"), stderr=subprocess.STDOUT)
        run.servers.append(p)
        urls.append(f"nats://127.0.0.1:{client}")

    def healthy(http):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=1) as r:
                if r.status != 200:
                    return False
            if n == 1:
                return True
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/jsz", timeout=1) as r:
                return bool(json.load(r).get("meta_cluster", {}).get("leader"))
        except OSError:
            return False

    for _, http, _ in ports:
        wait(lambda: healthy(http), "nats-server health", 30)
    return urls, [f"http://127.0.0.1:{http}" for _, http, _ in ports]


def stream_state(monitor, name):
    """The state of a stream (messages, last_ts...) from a server's monitoring port."""
    with urllib.request.urlopen(f"{monitor}/jsz?streams=true", timeout=5) as r:
        jsz = json.load(r)
    for acc in jsz.get("account_details", []):
        for st in acc.get("stream_detail", []):
            if st.get("name") == name:
                return st["state"]
    return None


def rfc3339_unix(text):
    """Unix seconds of an RFC 3339 time (nanosecond fractions cut to microseconds)."""
    m = re.match(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text)
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.datetime.fromisoformat(f"{m.group(1)}.{frac}{tz}").timestamp()


def server_version():
    r = subprocess.run([NATS_SERVER, "--version"], capture_output=True, text=True)
    return (r.stdout or r.stderr).strip().split()[-1]


# ---------------------------------------------------------------------------------------------
# Supervisor nodes


def fault(name, args, extra=""):
    words = ", ".join(json.dumps(a) for a in [WORKER, "fault", *args])
    return f"  {name}:\n    command: [{words}]\n    protocol: true\n{extra}"


PAYLOAD = '{"config_key": "hex8_2p", "new_games": {i}, "total_games": {now_us}}'


def make_node(run, where, node_id, urls):
    root = where / node_id
    (root / "config").mkdir(parents=True)
    daemons = [
        '  napper:\n    command: ["sleep", "100000"]\n',
        "  queue_populator:\n    heartbeat_interval: 0.2\n",
    ]
    if node_id == "node-a":
        daemons.append(fault("single", ["--emit", "NEW_GAMES_AVAILABLE", "--emit-count", str(LATENCY),
                                        "--emit-payload", PAYLOAD], "    interval: 0.025\n"))
        daemons.append(fault("burst", ["--emit", "NEW_GAMES_AVAILABLE", "--emit-burst", "--emit-count",
                                       str(BURST), "--emit-payload", PAYLOAD], "    interval: 3600\n"))
    servers = ", ".join(urls)
    (root / "config" / "unified_loop.yaml").write_text(
        "http:\n  enabled: false\n"
        "logs:\n  max_bytes: 1000000000\n  max_files: 2\n"
        f"cluster:\n  enabled: true\n  node_id: {node_id}\n  servers: [{servers}]\n"
        f"  heartbeat_interval: 300ms\n  node_expiry: 2s\n  lease_ttl: {LEASE_TTL:g}s\n"
        "daemons:\n" + "".join(daemons)
    )
    run.roots.append(root)
    return root


def cluster_nodes(root):
    r = subprocess.run([SUP, "--root", str(root), "cluster", "status", "--json"], capture_output=True,
                       text=True, timeout=30)
    try:
        rep = json.loads(r.stdout)
    except ValueError:
        return []
    return [n["node_id"] for n in rep.get("nodes", [])]


class Follower:
    """`events -f --json --type NEW_GAMES_AVAILABLE` on a root; each line stamped on arrival."""

    def __init__(self, run, root):
        self.events = []   # (arrival unix µs, event)
        self.lock = threading.Lock()
        self.p = subprocess.Popen([SUP, "--root", str(root), "events", "-f", "--json", "--type",
                                   "NEW_GAMES_AVAILABLE"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        run.followers.append(self.p)
        self.t = threading.Thread(target=self.read, daemon=True)
        self.t.start()

    def read(self):
        for line in self.p.stdout:
            now = time.time_ns() // 1000
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.events.append((now, ev))

    def of(self, source, node):
        with self.lock:
            return [(t, e) for t, e in self.events if e["source"] == source and e.get("node") == node]


ACQUIRED = re.compile(r"lease queue_populator acquired at (\S+)")


def acquisitions(root):
    try:
        text = (root / "logs" / "master_loop.log").read_text(errors="replace")
    except OSError:
        return []
    return [datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
            for m in ACQUIRED.finditer(text)]


def envelope_bytes(ev):
    """Size of what the outbox puts on the stream for this event: {"node", "event"} (serde_json,
    compact), the event as logged on its node (no `node`)."""
    local = {k: v for k, v in ev.items() if k != "node"}
    return len(json.dumps({"node": "node-a", "event": local}, separators=(",", ":")))


def supervisor_phase(run, where, urls, monitors):
    res = {}
    roots = [make_node(run, where, n, urls) for n in NODES]
    for r in roots:
        sup(r, "start", "napper")
    a, b, c = roots
    wait(lambda: all(cluster_nodes(r) == list(NODES) for r in roots), "all three nodes to see each other")
    fa, fc = Follower(run, a), Follower(run, c)
    time.sleep(0.5)

    # Latency: one event every 25 ms.
    log(f"  latency: {LATENCY} events, one every 25 ms")
    sup(a, "start", "single", "--no-wait")
    wait(lambda: len(fc.of("single", "node-a")) >= LATENCY, "the latency samples on node-c", 120)
    remote = [(t - e["payload"]["total_games"]) / 1000.0 for t, e in fc.of("single", "node-a")]
    local = [(t - e["payload"]["total_games"]) / 1000.0 for t, e in fa.of("single", None)]
    res["payload_bytes"] = envelope_bytes(fc.of("single", "node-a")[0][1])
    res["latency"] = {
        "samples": len(remote),
        "p50_ms": statistics.median(remote), "p99_ms": pct(remote, 99), "max_ms": max(remote),
        "same_node_p50_ms": statistics.median(local), "same_node_p99_ms": pct(local, 99),
    }
    log(f"    cross-node p50 {res['latency']['p50_ms']:.2f} ms, p99 {res['latency']['p99_ms']:.2f} ms")

    # Throughput: a burst of BURST events on node a.
    log(f"  throughput: a burst of {BURST} events")
    sup(a, "start", "burst", "--no-wait")
    wait(lambda: len(fc.of("burst", "node-a")) >= BURST, "the burst on node-c", 180)
    got_c = fc.of("burst", "node-a")
    got_a = fa.of("burst", None)
    first_emit = min(e["payload"]["total_games"] for _, e in got_c)
    last_c = max(t for t, _ in got_c)
    wait(lambda: len(fa.of("burst", None)) >= BURST, "the burst on node-a")
    last_a = max(t for t, _ in fa.of("burst", None))
    # When the last one was on the stream (node a's outbox done): the leader's view.
    states = [st for st in (stream_state(m, "RINGRIFT_EVENTS") for m in monitors) if st]
    on_stream = max(rfc3339_unix(st["last_ts"]) for st in states) * 1e6
    time.sleep(1.0)  # anything duplicated would show by now
    ids_c = [e["id"] for _, e in fc.of("burst", "node-a")]
    listing = [json.loads(line) for line in sup(b, "events", "--json", "--type", "NEW_GAMES_AVAILABLE").splitlines()]
    ids_b = [e["id"] for e in listing if e.get("node") == "node-a" and e["source"] == "burst"]
    ids_a = {e["id"] for _, e in got_a}
    secs = (last_c - first_emit) / 1e6
    res["throughput"] = {
        "events": BURST,
        "seconds": secs,
        "per_second": BURST / secs,
        "logged_on_a_seconds": (last_a - first_emit) / 1e6,
        "on_stream_seconds": (on_stream - first_emit) / 1e6,
        "received_c": len(ids_c), "unique_c": len(set(ids_c)), "missing_c": len(ids_a - set(ids_c)),
        "received_b": len(ids_b), "unique_b": len(set(ids_b)), "missing_b": len(ids_a - set(ids_b)),
    }
    log(f"    {BURST / secs:.0f} events/s ({secs:.2f} s; logged on node-a in "
        f"{res['throughput']['logged_on_a_seconds']:.2f} s, all on the stream in "
        f"{res['throughput']['on_stream_seconds']:.2f} s); node-b {len(ids_b)}, node-c {len(ids_c)} received")
    for p in (fa.p, fc.p):
        stop_proc(p, signal.SIGTERM, 5)
        run.followers.remove(p)

    # Failover of the queue_populator lease.
    log(f"  failover: {FAILOVERS} kills of the lease holder")
    for r in roots:
        sup(r, "start", "queue_populator")
    counts = {r: 0 for r in roots}

    def new_acquisition():
        for r in roots:
            n = len(acquisitions(r))
            if n > counts[r]:
                return r
        return None

    holder = None
    wait(lambda: new_acquisition() is not None, "the first lease holder", 30)
    holder = new_acquisition()
    for r in roots:
        counts[r] = len(acquisitions(r))
    rounds = []
    for i in range(FAILOVERS):
        time.sleep(1.0 + random.random())
        pid = supervisor_pid(holder)
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        run.killed.add(holder)
        wait(lambda: new_acquisition() is not None, "another node to take the lease", 30)
        seen_at = time.time()
        new = new_acquisition()
        taken = acquisitions(new)[-1]
        rounds.append({"from": holder.name, "to": new.name, "seconds": taken - killed_at,
                       "seen_by_bench_seconds": seen_at - killed_at})
        log(f"    {holder.name} → {new.name}: {taken - killed_at:.3f} s")
        # The killed node comes back (standby) for the next round.
        sup(holder, "start", "napper", "queue_populator")
        run.killed.discard(holder)
        for r in roots:
            counts[r] = len(acquisitions(r))
        holder = new
    secs = [r["seconds"] for r in rounds]
    res["failover"] = {
        "rounds": rounds,
        "lease_ttl_seconds": LEASE_TTL,
        "median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs),
    }
    for r in roots:
        stop_root(r, False)
        run.roots.remove(r)
    return res


def nats_phase(urls, replicas, size):
    args = [NATSBENCH, "--publish", urls[0], "--consume", urls[-1], "--replicas", str(replicas),
            "--size", str(size), "--samples", str(LATENCY), "--gap-ms", "10", "--burst", str(BURST)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=max(30, DEADLINE - time.monotonic()))
    if r.returncode != 0:
        raise RuntimeError(f"natsbench failed: {r.stderr}")
    out = json.loads(r.stdout)
    for c in out["consumers"]:
        log(f"    NATS ({c['consumer']} consumer): p50 {c['latency_ms_p50']:.2f} ms, p99 "
            f"{c['latency_ms_p99']:.2f} ms; {c['sync']['per_second']:.0f} msg/s one at a time, "
            f"{c['pipelined']['per_second']:.0f} msg/s pipelined")
    return out


def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_total_kib": int(open("/proc/meminfo").readline().split()[1]),
        "kernel": platform.release(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
    }


def fmt(v, digits=2):
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def table(r):
    tops = [r["topologies"][k] for k in sorted(r["topologies"], key=int)]

    def nats(top, mode):
        return next(c for c in top["nats"]["consumers"] if c["consumer"] == mode)

    inflight = tops[0]["nats"]["consumers"][0]["pipelined"]["inflight"]
    rows = [
        ("cross-node event latency p50 (ms)",
         lambda x: x["supervisor"]["latency"]["p50_ms"], lambda x: nats(x, "stream")["latency_ms_p50"],
         lambda x: nats(x, "fetch")["latency_ms_p50"]),
        ("cross-node event latency p99 (ms)",
         lambda x: x["supervisor"]["latency"]["p99_ms"], lambda x: nats(x, "stream")["latency_ms_p99"],
         lambda x: nats(x, "fetch")["latency_ms_p99"]),
        ("throughput, one publish at a time (events/s)",
         lambda x: x["supervisor"]["throughput"]["per_second"], lambda x: nats(x, "stream")["sync"]["per_second"],
         lambda x: nats(x, "fetch")["sync"]["per_second"]),
        (f"throughput, {inflight} publishes in flight (msg/s)",
         lambda x: None, lambda x: nats(x, "stream")["pipelined"]["per_second"],
         lambda x: nats(x, "fetch")["pipelined"]["per_second"]),
    ]

    def servers(x):
        return f"{x['servers']} server{'s' if x['servers'] > 1 else ''}"

    out = ["| | supervisor (3 nodes) | NATS (pull consumer, ack) | NATS (the inbox's pattern) |",
           "|---|---|---|---|"]
    for label, s, n, f in rows:
        for x in tops:
            out.append(f"| {label}, {servers(x)} | {fmt(s(x))} | {fmt(n(x))} | {fmt(f(x))} |")
    for x in tops:
        lat = x["supervisor"]["latency"]
        out.append(f"| same node (no NATS): latency p50 / p99 (ms), {servers(x)} | "
                   f"{fmt(lat['same_node_p50_ms'])} / {fmt(lat['same_node_p99_ms'])} | – | – |")
    for x in tops:
        f = x["supervisor"]["failover"]
        out.append(f"| lease failover after SIGKILL, median (min–max) of {len(f['rounds'])} (s), "
                   f"{servers(x)} | {fmt(f['median_s'])} ({fmt(f['min_s'])}–{fmt(f['max_s'])}) | – | – |")
    return "\n".join(out)


def main():
    for path in (SUP, WORKER, NATSBENCH):
        if not os.access(path, os.X_OK):
            sys.exit(f"{path} is missing: run bench/cluster.sh (it builds them)")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    result = {"machine": machine(), "versions": {
        "ringrift-supervisor": subprocess.run([SUP, "--version"], capture_output=True, text=True).stdout.strip(),
        "nats-server": server_version()},
        "settings": {"latency_samples": LATENCY, "burst": BURST, "failovers": FAILOVERS, "lease_ttl_s": LEASE_TTL,
                     "heartbeat_interval_s": 0.3, "node_expiry_s": 2.0},
        "topologies": {}}
    tmp = Path(tempfile.mkdtemp(prefix="rr-cluster-bench-"))
    run = Run(tmp)
    try:
        for n in TOPOLOGIES:
            log(f"{n} NATS server{'s' if n > 1 else ''}: starting")
            where = tmp / f"servers{n}"
            urls, monitors = start_servers(run, n, where / "nats")
            top = {"servers": n}
            top["supervisor"] = supervisor_phase(run, where, urls, monitors)
            log(f"  NATS itself ({top['supervisor']['payload_bytes']}-byte messages)")
            top["nats"] = nats_phase(urls, n, top["supervisor"]["payload_bytes"])
            result["topologies"][str(n)] = top
            run.cleanup()
    finally:
        run.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    save_and_print(result, started, "cluster-latest.json", table(result))


def save_and_print(result, started, name, text):
    """Writes bench/results/<name> and prints the machine line and the table (shared with
    bench/queue.py)."""
    result["machine"]["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    result["elapsed_secs"] = round(time.monotonic() - started, 1)
    out = REPO / "bench" / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(f"Machine: {m['nproc']} CPUs, {m['cpu']}, {m['mem_total_kib'] // 1024} MiB RAM, Linux {m['kernel']}; "
          f"run {m['date']}, {result['elapsed_secs']:.0f} s in all; nats-server {result['versions']['nats-server']}. "
          f"Load average at start {' '.join(m['loadavg_at_start'])}, at end {' '.join(m['loadavg_at_end'])}.")
    print()
    print(text)
    print(f"\nsaved {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (Timeout, KeyboardInterrupt) as e:
        sys.exit(f"cluster.py: stopped: {e}")
