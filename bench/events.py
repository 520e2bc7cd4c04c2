#!/usr/bin/env python3
"""Event router benchmark: events per second from one publisher to ten subscribers, and the
end-to-end latency of a single event (publisher's emit → subscriber's handler), on the release
binaries, in a temporary root. Bounded in time; stops everything it starts.

    python3 bench/events.py            # N=20000 burst events, 50 latency samples
    BENCH_EVENTS=5000 python3 bench/events.py
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "target" / "release"
SUP = str(BIN / "ringrift-supervisor")
WORKER = str(BIN / "ringrift-worker")
N = int(os.environ.get("BENCH_EVENTS", "20000"))
SUBSCRIBERS = 10
LATENCY_SAMPLES = int(os.environ.get("BENCH_LATENCY_SAMPLES", "50"))
DEADLINE = time.monotonic() + float(os.environ.get("BENCH_TIMEOUT", "300"))


def sup(root, *args, check=True):
    r = subprocess.run([SUP, "--root", root, *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stdout}{r.stderr}")
    return r.stdout


def wait(cond, what):
    while not cond():
        if time.monotonic() > DEADLINE:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


LINE = re.compile(r"event seq=(\d+) id=(\S+) type=(\S+) source=(\S+) recv_us=(\d+) payload=(.*)$")


def received(root, name):
    out = []
    for path in sorted(Path(root, "logs").glob(f"{name}.log*")):
        for line in path.read_text(errors="replace").splitlines():
            m = LINE.search(line)
            if m:
                out.append((int(m.group(1)), m.group(4), int(m.group(5)), json.loads(m.group(6))))
    return out


def fault(name, args, extra=""):
    words = ", ".join(json.dumps(a) for a in [WORKER, "fault", *args])
    return f"  {name}:\n    command: [{words}]\n    protocol: true\n{extra}"


def main():
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
    root = tempfile.mkdtemp(prefix="rr-events-bench-")
    payload = '{"config_key": "hex8_2p", "new_games": {i}, "total_games": {now_us}}'
    entries = [fault(f"sub{i:02d}", ["--subscribe", "NEW_GAMES_AVAILABLE"]) for i in range(SUBSCRIBERS)]
    entries.append(fault("burst", ["--emit", "NEW_GAMES_AVAILABLE", "--emit-burst", "--emit-count", str(N), "--emit-payload", payload], "    interval: 3600\n"))
    entries.append(fault("single", ["--emit", "NEW_GAMES_AVAILABLE", "--emit-count", str(LATENCY_SAMPLES), "--emit-payload", payload], "    interval: 0.1\n"))
    Path(root, "config").mkdir()
    Path(root, "config/unified_loop.yaml").write_text(
        "http:\n  enabled: false\nlogs:\n  max_bytes: 1000000000\n  max_files: 2\ndaemons:\n" + "".join(entries)
    )
    subs = [f"sub{i:02d}" for i in range(SUBSCRIBERS)]
    try:
        sup(root, "start", *subs)
        wait(lambda: Path(root, "logs/master_loop.log").read_text().count("subscribed to") >= SUBSCRIBERS, "subscriptions")

        # Throughput: one burst of N events.
        sup(root, "start", "burst", "--no-wait")
        def all_delivered():
            st = json.loads(sup(root, "status", "--json"))
            last = st["events"]["last_seq"]
            backlogs = [d["event_backlog"] for d in st["daemons"] if d["name"] in subs]
            return last >= N and all(b == 0 for b in backlogs)
        wait(all_delivered, "the burst to reach every subscriber")
        got = {s: received(root, s) for s in subs}
        burst = {s: [e for e in got[s] if e[1] == "burst"] for s in subs}
        sent = [e[3]["total_games"] for e in burst[subs[0]]]
        first_sent = min(sent)
        last_recv = max(max(e[2] for e in burst[s]) for s in subs)
        secs = (last_recv - first_sent) / 1e6
        for s in subs:
            ids = {e[0] for e in burst[s]}
            assert len(ids) == N, f"{s} got {len(ids)} of {N} events"
        throughput = N / secs

        # Latency: single events, 100 ms apart.
        sup(root, "start", "single", "--no-wait")
        def singles_done():
            return all(len([e for e in received(root, s) if e[1] == "single"]) >= LATENCY_SAMPLES for s in subs)
        wait(singles_done, "the latency samples")
        lat = []
        for s in subs:
            for e in received(root, s):
                if e[1] == "single":
                    lat.append((e[2] - e[3]["total_games"]) / 1000.0)
        lat.sort()
        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"nproc": os.cpu_count(), "kernel": os.uname().release},
            "events": N,
            "subscribers": SUBSCRIBERS,
            "burst_seconds": round(secs, 3),
            "events_per_second": round(throughput),
            "deliveries_per_second": round(throughput * SUBSCRIBERS),
            "latency_ms_median": round(statistics.median(lat), 3),
            "latency_ms_p95": round(lat[int(len(lat) * 0.95) - 1], 3),
            "latency_samples": len(lat),
        }
    finally:
        sup(root, "shutdown", check=False)
    out = REPO / "bench" / "results" / "events-latest.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"events, one publisher → {SUBSCRIBERS} subscribers (release build, {os.cpu_count()} cores)")
    print(f"  throughput   {result['events_per_second']:>10} events/s  ({result['deliveries_per_second']} deliveries/s, {N} events in {result['burst_seconds']} s)")
    print(f"  latency      {result['latency_ms_median']:>10} ms median, {result['latency_ms_p95']} ms p95  ({len(lat)} samples)")
    print(f"saved {out.relative_to(REPO)}")


if __name__ == "__main__":
    sys.exit(main())
