#!/usr/bin/env python3
"""Soak: churn events, restarts and HTTP/socket clients (well-behaved and hostile) against one
supervisor on the release binaries, and print its RSS and descriptor count at the start and at the
end (issue 9: "the supervisor's memory stays flat under any sustained churn").

    python3 bench/soak.py                 # 180 s of churn
    SOAK_SECS=60 python3 bench/soak.py    # shorter
    bench/soak.sh                         # builds the release binaries first

Bounded: every loop stops at the deadline, every process and connection it starts is ended, and it
talks to loopback only. Writes bench/results/soak-latest.json.
"""

import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "target" / "release"
SUP = str(BIN / "ringrift-supervisor")
WORKER = str(BIN / "ringrift-worker")
SECS = float(os.environ.get("SOAK_SECS", "180"))
WARMUP = float(os.environ.get("SOAK_WARMUP", "5"))


def sup(root, *args, check=True, timeout=60):
    r = subprocess.run([SUP, "--root", root, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stdout}{r.stderr}")
    return r.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fault(name, args, extra=""):
    words = ", ".join(json.dumps(a) for a in [WORKER, "fault", *args])
    return f"  {name}:\n    command: [{words}]\n    protocol: true\n{extra}"


def config(port):
    daemons = [
        # Event churn: three publishers, one subscriber.
        *(
            fault(
                f"pub_{i}",
                ["--emit", "NEW_GAMES_AVAILABLE", "--emit-count", "100000000",
                 "--emit-payload", '{"config_key": "hex8_2p", "new_games": {i}}'],
                "    interval: 0.02\n",
            )
            for i in range(3)
        ),
        fault("sub", ["--subscribe", "NEW_GAMES_AVAILABLE"], "    interval: 0.5\n"),
        # Restart churn: a daemon that crashes every 300 ms, with no restart budget limit.
        fault(
            "crashy",
            ["--crash-after-ms", "300"],
            "    interval: 0.5\n    restart: always\n    max_restarts: 1000000\n"
            "    backoff_initial: 0.05\n    backoff_max: 0.2\n",
        ),
        "  napper:\n    command: [\"sleep\", \"100000\"]\n",
    ]
    return (
        f"http:\n  addr: 127.0.0.1:{port}\n"
        "daemons:\n" + "".join(daemons)
    )


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Counter:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}

    def add(self, key, n=1):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n


def http_client(port, token, deadline, stats):
    """Well-behaved reads and authenticated writes."""
    base = f"http://127.0.0.1:{port}"
    body = json.dumps({"type": "NEW_GAMES_AVAILABLE", "payload": {"config_key": "hex8_2p", "new_games": 1}}).encode()
    routes = ["/health", "/daemon/status", "/metrics", "/events?limit=1000", "/daemon/napper/health"]
    i = 0
    while time.monotonic() < deadline:
        i += 1
        try:
            if i % 4 == 0:
                req = urllib.request.Request(base + "/event", data=body, method="POST",
                                             headers={"Authorization": f"Bearer {token}",
                                                      "Content-Type": "application/json"})
            else:
                req = urllib.request.Request(base + routes[i % len(routes)])
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
            stats.add("http ok")
        except urllib.error.HTTPError as e:
            stats.add(f"http {e.code}")
        except Exception as e:  # noqa: BLE001 - counted, not fatal
            stats.add(f"http error {type(e).__name__}")


def hostile_http(port, deadline, stats):
    """Requests without a newline, idle connections, unauthenticated 1 MB posts."""
    big = b"x" * 1_000_000
    while time.monotonic() < deadline:
        # A request line that never ends.
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /")
                for _ in range(32):
                    s.sendall(b"a" * 65536)
        except OSError:
            stats.add("hostile line cut off")
        # Fifty idle connections, held a moment.
        idle = []
        for _ in range(50):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                stats.add("idle refused")
        time.sleep(0.5)  # hold them (load, not synchronisation)
        for s in idle:
            s.close()
        # An unauthenticated 1 MB post.
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"POST /event HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big))
                s.sendall(big)
                s.recv(4096)
            stats.add("unauthenticated post")
        except OSError:
            stats.add("unauthenticated post cut")


def unread_socket_client(sock_path, deadline, stats):
    """Asks for status again and again without reading the replies, until cut off."""
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(sock_path)
                s.sendall(b'{"type":"hello","protocol":1,"role":"cli"}\n')
                for _ in range(200):
                    s.sendall(b'{"type":"status"}\n' * 100)
        except OSError:
            stats.add("unread client cut off")


def restarter(root, deadline, stats):
    while time.monotonic() < deadline:
        r = subprocess.run([SUP, "--root", root, "restart", "napper"], capture_output=True, timeout=60)
        stats.add("restart ok" if r.returncode == 0 else "restart failed")
        time.sleep(1)  # pacing of the churn, not synchronisation


def main():
    if not Path(SUP).exists():
        raise SystemExit(f"{SUP} is missing: run `cargo build --release --bins` (or bench/soak.sh)")
    root = tempfile.mkdtemp(prefix="rr-soak-")
    port = free_port()
    Path(root, "config").mkdir()
    Path(root, "config", "unified_loop.yaml").write_text(config(port))
    stats = Counter()
    try:
        sup(root, "start", "--all")
        pid = int(Path(root, "run", "supervisor.pid").read_text())
        time.sleep(WARMUP)  # let start-up allocations settle before the baseline
        start = {"rss_kib": rss_kib(pid), "fds": fds(pid)}
        token = Path(root, "run", "http.token").read_text().strip()
        deadline = time.monotonic() + SECS
        workers = [
            threading.Thread(target=http_client, args=(port, token, deadline, stats)),
            threading.Thread(target=http_client, args=(port, token, deadline, stats)),
            threading.Thread(target=hostile_http, args=(port, deadline, stats)),
            threading.Thread(target=unread_socket_client, args=(str(Path(root, "run", "supervisor.sock")), deadline, stats)),
            threading.Thread(target=restarter, args=(root, deadline, stats)),
        ]
        for w in workers:
            w.start()
        peak = dict(start)
        while time.monotonic() < deadline:
            time.sleep(1)
            peak["rss_kib"] = max(peak["rss_kib"], rss_kib(pid))
            peak["fds"] = max(peak["fds"], fds(pid))
        for w in workers:
            w.join(timeout=60)
        time.sleep(2)  # let the last connections close
        end = {"rss_kib": rss_kib(pid), "fds": fds(pid)}
        status = json.loads(sup(root, "status", "--json"))
        t0 = time.monotonic()
        sup(root, "status")
        status_ms = (time.monotonic() - t0) * 1000
        states = {d["name"]: d["state"] for d in status["daemons"]}
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.release()}",
            "secs": SECS,
            "start": start,
            "peak": peak,
            "end": end,
            "events_last_seq": status["events"]["last_seq"],
            "restarts": {d["name"]: d["restarts"] for d in status["daemons"]},
            "states": states,
            "status_ms_at_end": round(status_ms, 1),
            "clients": stats.counts,
        }
        print(f"soak: {SECS:.0f} s of churn on {result['machine']}")
        print(f"  supervisor RSS  start {start['rss_kib'] / 1024:6.1f} MiB   peak {peak['rss_kib'] / 1024:6.1f} MiB   end {end['rss_kib'] / 1024:6.1f} MiB")
        print(f"  descriptors     start {start['fds']:6d}       peak {peak['fds']:6d}       end {end['fds']:6d}")
        print(f"  events {result['events_last_seq']}, restarts of crashy {result['restarts'].get('crashy')}, "
              f"status at the end {status_ms:.0f} ms, states {sorted(set(states.values()))}")
        print(f"  clients: {json.dumps(stats.counts, sort_keys=True)}")
        out = REPO / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "soak-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    finally:
        subprocess.run([SUP, "--root", root, "shutdown", "--timeout", "30"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
