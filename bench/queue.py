#!/usr/bin/env python3
"""Shared work queue benchmark (issue 13): three supervisor nodes drain the cluster's JetStream
work queue with short synthetic selfplay jobs. Release binaries, one nats-server, loopback only.

    bench/queue.sh                                  # builds, then runs this
    BENCH_NO_BUILD=1 bench/queue.sh                 # the binaries already built
    QUEUE_JOB=1 QUEUE_DURATION=15 QUEUE_KILLS=2 python3 bench/queue.py   # quicker
    QUEUE_SLOTS=4 QUEUE_JOB_SPREAD=0.75 QUEUE_RESULT=queue-random-latest.json python3 bench/queue.py
                                                    # 4 slots, jobs of random length (issue 14)

In a temporary directory: nodes a, b, c, each a supervisor root in the cluster whose
selfplay_scheduler has QUEUE_SLOTS slots (default 2) and whose selfplay job is synthetic: it writes
`<unix time> start|end <node> <item>` to a shared records file around a `sleep QUEUE_JOB` (default
2 s), so that the queue, the claims and the scheduling are measured, not a game. node-a also runs
queue_populator, which keeps 3 items per slot of the cluster outstanding, so items are always
pending. `cluster.work_ack_wait` is QUEUE_ACK_WAIT (default 3 s).

- slot utilisation: over QUEUE_DURATION seconds (default 30) after every node has started a job,
  busy slot-time (the records' start→end, clipped to the window) over available slot-time
  (nodes × slots × window); the goal is ≥ 98 %;
- claim-to-start latency: from the supervisor's "work item N ... claimed" log line to the job's
  `start` record; and the gap from a job's end to the next start in the same node (a slot idle
  between two jobs);
- redelivery after a node dies: node-c's supervisor is SIGKILLed while it runs items; the time
  from the kill to each of those items' `start` on another node (≈ work_ack_wait plus up to a
  claim cycle). Repeated QUEUE_KILLS times (default 3), node-c restarted between rounds.

Writes bench/results/queue-latest.json and prints a markdown table. Bounded (QUEUE_TIMEOUT,
default 300 s); everything it starts is stopped and its temporary directory removed, also on
failure or SIGTERM/SIGINT.
"""

import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import cluster as cb  # the cluster benchmark's helpers: servers, roots, cleanup, machine facts

SLOTS = int(os.environ.get("QUEUE_SLOTS", "2"))
JOB = float(os.environ.get("QUEUE_JOB", "2"))
# Each job sleeps uniformly within JOB × (1 ± SPREAD) (0: always JOB).
SPREAD = float(os.environ.get("QUEUE_JOB_SPREAD", "0"))
RESULT = os.environ.get("QUEUE_RESULT", "queue-latest.json")
DURATION = float(os.environ.get("QUEUE_DURATION", "30"))
KILLS = int(os.environ.get("QUEUE_KILLS", "3"))
ACK_WAIT = float(os.environ.get("QUEUE_ACK_WAIT", "3"))
cb.DEADLINE = time.monotonic() + float(os.environ.get("QUEUE_TIMEOUT", "300"))
NODES = cb.NODES
log, wait, sup, pct = cb.log, cb.wait, cb.sup, cb.pct


def make_node(run, where, node_id, url, records):
    root = where / node_id
    (root / "config").mkdir(parents=True)
    lo, hi = JOB * (1 - SPREAD), JOB * (1 + SPREAD)
    sleep = (f'sleep $(awk -v r="$(od -An -N2 -tu2 /dev/urandom)" '
             f"'BEGIN {{{{ printf \"%.3f\", {lo} + ({hi} - {lo}) * r / 65535 }}}}')")
    script = (f'echo "$(date +%s.%N) start {node_id} $RINGRIFT_WORK_ITEM" >> {records}; {sleep}; '
              f'echo "$(date +%s.%N) end {node_id} $RINGRIFT_WORK_ITEM" >> {records}')
    populator = ""
    if node_id == "node-a":
        populator = (f"  queue_populator:\n    interval: 0.2\n    heartbeat_interval: 0.5\n"
                     f"    target_depth: {3 * SLOTS * len(NODES)}\n    games_per_item: 1\n")
    (root / "config" / "unified_loop.yaml").write_text(
        "http:\n  enabled: false\n"
        "logs:\n  max_bytes: 1000000000\n  max_files: 2\n"
        "pipeline:\n  config_keys: [hex8_2p]\n  jobs:\n    selfplay:\n"
        f"      command: [sh, -c, {json.dumps(script)}]\n      max_runtime: 600\n"
        f"cluster:\n  enabled: true\n  node_id: {node_id}\n  servers: [{url}]\n  roles: [selfplay]\n"
        f"  heartbeat_interval: 300ms\n  node_expiry: 2s\n  lease_ttl: 2s\n  work_ack_wait: {ACK_WAIT:g}s\n"
        "daemons:\n" + populator +
        f"  selfplay_scheduler:\n    interval: 0.2\n    heartbeat_interval: 0.5\n    slots: {SLOTS}\n"
    )
    run.roots.append(root)
    return root


def start_node(root):
    daemons = ["selfplay_scheduler"] + (["queue_populator"] if root.name == "node-a" else [])
    sup(root, "start", *daemons)


def records(path):
    """[(unix time, 'start'|'end', node, item)]"""
    out = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        w = line.split()
        if len(w) == 4 and w[1] in ("start", "end"):
            try:
                out.append((float(w[0]), w[1], w[2], int(w[3])))
            except ValueError:
                pass
    return out


CLAIM = re.compile(r"^(\S+) INFO  cluster: work item (\d+) \(.*\) claimed by ")


def claims(root):
    """{item: [claim unix times]} from a root's master_loop.log."""
    out = {}
    try:
        text = (root / "logs" / "master_loop.log").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        m = CLAIM.match(line)
        if m:
            out.setdefault(int(m.group(2)), []).append(cb.rfc3339_unix(m.group(1)))
    return out


def utilisation(recs, t0, t1):
    """Busy slot-seconds in [t0, t1] from start/end records (a start with no end runs to t1)."""
    open_ = {}
    busy = 0.0
    for t, kind, node, item in sorted(recs):
        key = (node, item)
        if kind == "start":
            open_[key] = t
        elif key in open_:
            s = open_.pop(key)
            busy += max(0.0, min(t, t1) - max(s, t0))
    for s in open_.values():
        busy += max(0.0, t1 - max(s, t0))
    return busy


def main():
    started = time.monotonic()
    result = {"issue": 13, "machine": cb.machine(),
              "settings": {"nodes": len(NODES), "slots_per_node": SLOTS, "job_secs": JOB, "job_spread": SPREAD,
                           "window_secs": DURATION, "work_ack_wait_secs": ACK_WAIT},
              "versions": {"nats-server": cb.server_version()}}
    tmp = Path(tempfile.mkdtemp(prefix="rr-queue-bench-"))
    run = cb.Run(tmp)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        urls, _ = cb.start_servers(run, 1, tmp / "nats")
        rec = tmp / "records"
        roots = {n: make_node(run, tmp, n, urls[0], rec) for n in NODES}
        for root in roots.values():
            start_node(root)
        log("waiting for every node to run a job")
        wait(lambda: {r[2] for r in records(rec) if r[1] == "start"} >= set(NODES), "a job on every node", 60)

        # Slot utilisation while items are pending.
        t0 = time.time() + JOB  # one job in: past the start-up
        log(f"measuring slot utilisation for {DURATION:g} s")
        time.sleep(JOB + DURATION)
        t1 = t0 + DURATION
        recs = records(rec)
        busy = utilisation(recs, t0, t1)
        available = len(NODES) * SLOTS * DURATION
        # Claim → start, per item's first delivery, and end → next start per node.
        latencies = []
        for root in roots.values():
            for item, times in claims(root).items():
                starts = sorted(t for t, k, n, i in recs if k == "start" and i == item and n == root.name)
                if starts and times:
                    latencies.append(max(0.0, starts[0] - times[0]))
        gaps = []
        for node in NODES:
            ends = sorted(t for t, k, n, _ in recs if k == "end" and n == node and t0 <= t <= t1)
            starts = sorted(t for t, k, n, _ in recs if k == "start" and n == node)
            for e in ends:
                nxt = [s for s in starts if s >= e]
                if nxt:
                    gaps.append(nxt[0] - e)
        jobs = sum(1 for t, k, _, _ in recs if k == "end" and t0 <= t <= t1)
        result["utilisation"] = {
            "busy_slot_secs": round(busy, 2), "available_slot_secs": round(available, 2),
            "percent": round(100 * busy / available, 2), "jobs_ended_in_window": jobs,
            "claim_to_start_ms": {"n": len(latencies), "p50": ms(pct(latencies, 50)),
                                  "p99": ms(pct(latencies, 99)), "max": ms(max(latencies, default=None))},
            "end_to_next_start_ms": {"n": len(gaps), "p50": ms(pct(gaps, 50)), "p99": ms(pct(gaps, 99)),
                                     "max": ms(max(gaps, default=None))},
        }
        log(f"  {result['utilisation']['percent']} % busy")

        # Redelivery after node-c dies.
        victim = roots["node-c"]
        redeliveries = []
        since = 0.0  # node-c's jobs killed in an earlier round never end: only later ones count

        def running_on_c():
            recs = records(rec)
            ended = {(n, i) for _, k, n, i in recs if k == "end"}
            return [i for t, k, n, i in recs
                    if k == "start" and n == "node-c" and t > since and ("node-c", i) not in ended]

        for round_ in range(KILLS):
            wait(lambda: running_on_c(), "a job on node-c", 30)
            time.sleep(random.uniform(0.0, JOB / 2))  # anywhere in its jobs and renewals
            running = running_on_c()
            if not running:
                continue
            pid = cb.supervisor_pid(victim)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.time()
            run.killed.add(victim)

            def elsewhere():
                later = [(t, i) for t, k, n, i in records(rec) if k == "start" and n != "node-c" and i in running
                         and t > killed_at]
                return {i: t for t, i in sorted(later, reverse=True)}

            wait(lambda: len(elsewhere()) == len(running), "the dead node's items elsewhere", 60)
            for i, t in elsewhere().items():
                redeliveries.append(t - killed_at)
            log(f"  round {round_ + 1}: {len(running)} item(s) of node-c ran elsewhere "
                f"{', '.join(f'{t - killed_at:.2f}s' for t in elsewhere().values())} after the kill")
            wait(lambda: not cb.alive(pid), "the killed supervisor gone", 20)
            since = time.time()
            start_node(victim)  # back for the next round (its start removes what the killed one left)
            run.killed.discard(victim)
        result["redelivery_secs"] = {"n": len(redeliveries), "p50": rnd(pct(redeliveries, 50)),
                                     "max": rnd(max(redeliveries, default=None)),
                                     "all": [round(x, 3) for x in redeliveries]}
    finally:
        run.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    cb.save_and_print(result, started, RESULT, table(result))


def ms(x):
    return None if x is None else round(1000 * x, 1)


def rnd(x):
    return None if x is None else round(x, 3)


def table(r):
    s, u, d = r["settings"], r["utilisation"], r["redelivery_secs"]
    c, g = u["claim_to_start_ms"], u["end_to_next_start_ms"]
    return "\n".join([
        f"Three nodes × {s['slots_per_node']} slots, synthetic jobs of "
        + (f"{s['job_secs']:g} s" if not s.get("job_spread") else
           f"{s['job_secs'] * (1 - s['job_spread']):g}–{s['job_secs'] * (1 + s['job_spread']):g} s "
           f"(uniformly random)")
        + ", "
        f"work_ack_wait {s['work_ack_wait_secs']:g} s, {s['window_secs']:g} s window:",
        "",
        "| figure | value |",
        "|---|---|",
        f"| slot utilisation while items are pending (goal ≥ 98 %) | **{u['percent']} %** "
        f"({u['busy_slot_secs']} of {u['available_slot_secs']} slot-s, {u['jobs_ended_in_window']} jobs) |",
        f"| claim → job start, p50 / p99 / max | {c['p50']} / {c['p99']} / {c['max']} ms (n = {c['n']}) |",
        f"| job end → next start in the node, p50 / p99 / max | {g['p50']} / {g['p99']} / {g['max']} ms "
        f"(n = {g['n']}) |",
        f"| redelivery after a node's SIGKILL, p50 / max | {d['p50']} / {d['max']} s (n = {d['n']}) |",
    ])


if __name__ == "__main__":
    try:
        main()
    except (cb.Timeout, KeyboardInterrupt) as e:
        sys.exit(f"queue.py: stopped: {e}")
