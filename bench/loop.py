#!/usr/bin/env python3
"""The loop benchmark (issue 14): one node, the whole self-improvement loop, two phases.

1. Synthetic selfplay (LOOP_SLOTS=4 slots): the selfplay job is a sleep of random length
   (uniform in LOOP_JOB × (1 ± LOOP_JOB_SPREAD), default 0.5–3.5 s) followed by the built-in
   selfplay job, so the rest of the loop (export, training, gauntlet, promotion) runs for real on
   the games. Measured over LOOP_DURATION seconds (default 180) after every slot has started a job:
   - slot utilisation: busy slot-time (each job's start→end, clipped to the window) over available
     slot-time, while work is pending (queue_populator keeps items queued);
   - the time from the first games (NEW_GAMES_AVAILABLE) to the first promoted model
     (MODEL_PROMOTED).
2. The default configuration as shipped (`start --all` on the embedded config, built-in jobs):
   the time from `start --all` to the first MODEL_PROMOTED, over LOOP_RUNS runs (default 3).

LOOP_KEEP=DIR copies the synthetic run's job records and logs there (to study the gaps between
jobs). Everything runs in a temporary directory; every supervisor started is shut down at the end (and
on a timeout, LOOP_TIMEOUT, default 900 s). Writes bench/results/loop-latest.json and prints the
table for the README.

    cargo build --release --bins && python3 bench/loop.py
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster as cb  # noqa: E402  (helpers: sup, stop_root, wait, machine, pct)

REPO = cb.REPO
SLOTS = int(os.environ.get("LOOP_SLOTS", "4"))
JOB = float(os.environ.get("LOOP_JOB", "2"))
SPREAD = float(os.environ.get("LOOP_JOB_SPREAD", "0.75"))
DURATION = float(os.environ.get("LOOP_DURATION", "180"))
RUNS = int(os.environ.get("LOOP_RUNS", "3"))
cb.DEADLINE = time.monotonic() + float(os.environ.get("LOOP_TIMEOUT", "900"))
log, sup = cb.log, cb.sup
# The embedded default, read from the file it is built from.
DEFAULT_YAML = (REPO / "config" / "unified_loop.yaml").read_text()
# Every run binds HTTP to a free port, so that nothing else on 8770 gets in the way.
ENV = {**os.environ, "RINGRIFT_HTTP__ADDR": "127.0.0.1:0"}


def events(root, kind):
    r = subprocess.run([cb.SUP, "--root", str(root), "events", "--json", "--type", kind],
                       capture_output=True, text=True, timeout=60, env=ENV)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def unix(ev):
    return cb.rfc3339_unix(ev["timestamp"])


def synthetic_config(records):
    lo, hi = JOB * (1 - SPREAD), JOB * (1 + SPREAD)
    sleep = (f'sleep $(awk -v r="$(od -An -N2 -tu2 /dev/urandom)" '
             f"'BEGIN {{{{ printf \"%.3f\", {lo} + ({hi} - {lo}) * r / 65535 }}}}')")
    selfplay = ("{worker} job selfplay --config-key {config_key} --games {games} --db {db_path} "
                "--model {model_path} --seed {seed}")
    script = (f'echo "$(date +%s.%N) start $$" >> {records}; {sleep}; {selfplay}; s=$?; '
              f'echo "$(date +%s.%N) end $$" >> {records}; exit $s')
    old = ('      command: ["{worker}", "job", "selfplay", "--config-key", "{config_key}", "--games", '
           '"{games}", "--db", "{db_path}", "--model", "{model_path}", "--seed", "{seed}"]')
    assert old in DEFAULT_YAML, "the shipped selfplay template changed"
    yaml = DEFAULT_YAML.replace(old, f"      command: [sh, -c, {json.dumps(script)}]")
    assert "    # selfplay_slots: 1 " in yaml, "the shipped capacity section changed"
    return yaml.replace("    # selfplay_slots: 1 ", f"    selfplay_slots: {SLOTS} ").replace(
        "    target_depth: 20 ", f"    target_depth: {3 * SLOTS} ")


def busy_secs(path, t0, t1):
    """Busy slot-seconds in [t0, t1] from the jobs' start/end records (a start with no end runs
    to t1), and the jobs that ended inside the window."""
    open_, busy, ended = {}, 0.0, 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        lines = []
    recs = []
    for line in lines:
        w = line.split()
        if len(w) == 3 and w[1] in ("start", "end"):
            recs.append((float(w[0]), w[1], w[2]))
    for t, kind, pid in sorted(recs):
        if kind == "start":
            open_[pid] = t
        elif pid in open_:
            s = open_.pop(pid)
            busy += max(0.0, min(t, t1) - max(s, t0))
            ended += t0 <= t <= t1
    for s in open_.values():
        busy += max(0.0, t1 - max(s, t0))
    return busy, ended


def starts(path):
    try:
        return [float(l.split()[0]) for l in path.read_text().splitlines() if " start " in l]
    except OSError:
        return []


def synthetic(where, roots):
    root = where / "synthetic"
    (root / "config").mkdir(parents=True)
    records = where / "jobs.txt"
    (root / "config" / "unified_loop.yaml").write_text(synthetic_config(records))
    roots.append(root)
    subprocess.run([cb.SUP, "--root", str(root), "start", "--all"], check=True, env=ENV,
                   capture_output=True, timeout=60)
    t_start = time.time()
    cb.wait(lambda: len(starts(records)) >= SLOTS, f"{SLOTS} selfplay jobs started", 120)
    t0 = sorted(starts(records))[SLOTS - 1]
    log(f"synthetic: {SLOTS} slots busy; measuring for {DURATION:g} s")
    cb.wait(lambda: time.time() >= t0 + DURATION, "the measuring window", DURATION + 30)
    t1 = t0 + DURATION
    busy, ended = busy_secs(records, t0, t1)
    if os.environ.get("LOOP_KEEP"):  # for a look at the gaps: the records and the logs
        keep = Path(os.environ["LOOP_KEEP"])
        keep.mkdir(parents=True, exist_ok=True)
        for f in [records, root / "logs" / "master_loop.log", root / "logs" / "selfplay_scheduler.log"]:
            keep.joinpath(f.name).write_bytes(f.read_bytes())
    games = events(root, "NEW_GAMES_AVAILABLE")
    promoted = events(root, "MODEL_PROMOTED")
    first_games = unix(games[0]) if games else None
    first_promotion = unix(promoted[0]) if promoted else None
    cb.stop_root(root, False)
    return {
        "slots": SLOTS, "job_secs": [round(JOB * (1 - SPREAD), 3), round(JOB * (1 + SPREAD), 3)],
        "window_secs": DURATION, "busy_slot_secs": round(busy, 2),
        "available_slot_secs": round(SLOTS * DURATION, 2),
        "utilisation_percent": round(100 * busy / (SLOTS * DURATION), 2),
        "jobs_ended_in_window": ended,
        "games_to_promotion_secs": (round(first_promotion - first_games, 1)
                                    if first_games and first_promotion else None),
        "start_to_promotion_secs": round(first_promotion - t_start, 1) if first_promotion else None,
        "promotions": len(promoted),
    }


def default_run(where, roots, n):
    root = where / f"default-{n}"
    root.mkdir()
    roots.append(root)
    t_start = time.time()
    subprocess.run([cb.SUP, "--root", str(root), "start", "--all"], check=True, env=ENV,
                   capture_output=True, timeout=60)
    cb.wait(lambda: events(root, "MODEL_PROMOTED"), "the first promotion", 600)
    promoted = unix(events(root, "MODEL_PROMOTED")[0])
    games = events(root, "NEW_GAMES_AVAILABLE")
    cb.stop_root(root, False)
    return {"start_to_promotion_secs": round(promoted - t_start, 1),
            "games_to_promotion_secs": round(promoted - unix(games[0]), 1) if games else None}


def table(r):
    s, d = r["synthetic"], r["default"]
    med = statistics.median(x["start_to_promotion_secs"] for x in d)
    return "\n".join([
        "| measure | result |",
        "| --- | --- |",
        f"| selfplay slot utilisation, {s['slots']} slots, jobs of {s['job_secs'][0]:g}–{s['job_secs'][1]:g} s "
        f"(random), {s['window_secs']:g} s (goal ≥ 98 %) | **{s['utilisation_percent']} %** "
        f"({s['busy_slot_secs']} of {s['available_slot_secs']} slot-s, {s['jobs_ended_in_window']} jobs) |",
        f"| same run: first games → first promoted model | {s['games_to_promotion_secs']} s "
        f"({s['promotions']} promotion(s) in the run) |",
        f"| default configuration, `start --all` → first promoted model (median of {len(d)}; "
        f"was about 240 s) | **{med:g} s** (runs: {', '.join(str(x['start_to_promotion_secs']) for x in d)} s) |",
    ])


def main():
    started = time.monotonic()
    roots = []

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    result = {"machine": cb.machine()}
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as tmp:
        where = Path(tmp)
        try:
            result["synthetic"] = synthetic(where, roots)
            log(f"synthetic: {result['synthetic']}")
            result["default"] = []
            for n in range(RUNS):
                result["default"].append(default_run(where, roots, n))
                log(f"default run {n + 1}: {result['default'][-1]}")
        finally:
            for root in roots:
                cb.stop_root(root, False)
    result["machine"]["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    result["elapsed_secs"] = round(time.monotonic() - started, 1)
    out = REPO / "bench" / "results" / "loop-latest.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(f"Machine: {m['nproc']} CPUs, {m['cpu']}, {m['mem_total_kib'] // 1024} MiB RAM, "
          f"Linux {m['kernel']}; run {m['date']}, {result['elapsed_secs']:.0f} s in all. Load average "
          f"at start {' '.join(m['loadavg_at_start'])}, at end {' '.join(m['loadavg_at_end'])}.")
    print()
    print(table(result))
    print(f"\nsaved {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (cb.Timeout, KeyboardInterrupt) as e:
        sys.exit(f"loop.py: stopped: {e}")
