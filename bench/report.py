"""Renders bench.py's results: the console table and bench/TABLE.md.

`python3 bench/report.py [results.json]` re-renders TABLE.md from a saved run (default
bench/results/latest.json). bench/FINDINGS.md (hand-written after investigating a run) is appended.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COLS = [("ours", "ours (30 external)"), ("ours_workers", "ours (30 workers)"),
        ("supervisord", "supervisord"), ("s6", "s6"), ("runit", "runit")]
PEERS = ("supervisord", "s6", "runit")


def g(r, metric, col, *path):
    v = r["metrics"].get(metric, {}).get(col)
    for p in path:
        if v is None:
            return None
        v = v.get(p) if isinstance(v, dict) else None
    return v


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def idle_sum(r, col, keys, field):
    d = r["metrics"].get("idle", {}).get(col)
    if not d:
        return None
    present = [k for k in keys if k in d]
    return sum(d[k][field] for k in present) if present else None


def rows(r):
    """(label, {col: value}, digits, ratio?) for every table row."""
    out = []

    def row(label, values, digits=1, ratio=True, ours_col="ours"):
        out.append((label, values, digits, ratio, ours_col))

    row(f"cold start: {r['settings']['N']} up, median of {r['settings']['cold_reps']} (ms)",
        {c: g(r, "cold_start_ms", c, "median") for c, _ in COLS})
    row("restart after SIGKILL → new pid, median (ms)", {c: g(r, "restart_new_pid_ms", c, "median") for c, _ in COLS}, 2)
    row("restart after SIGKILL → new pid, p95 (ms)", {c: g(r, "restart_new_pid_ms", c, "p95") for c, _ in COLS}, 2)
    row("restart → RUNNING after handshake, median (ms)",
        {"ours_workers": g(r, "restart_running_ms", "ours_workers", "median")}, 2, False)
    row("restart → RUNNING after handshake, p95 (ms)",
        {"ours_workers": g(r, "restart_running_ms", "ours_workers", "p95")}, 2, False)
    secs = r["settings"]["idle_secs"]
    row(f"idle {secs:.0f} s: supervisor CPU ticks (1/{r['machine']['clk_tck']} s)",
        {c: idle_sum(r, c, ["supervisor"], "ticks") for c, _ in COLS}, 0)
    row(f"idle {secs:.0f} s: supervisor CPU (ms, schedstat)",
        {c: idle_sum(r, c, ["supervisor"], "cpu_ms") for c, _ in COLS}, 2)
    row(f"idle {secs:.0f} s: per-service helpers / workers CPU (ms)",
        {c: idle_sum(r, c, ["helpers", "workers"], "cpu_ms") for c, _ in COLS}, 2, False)
    row(f"idle {secs:.0f} s: supervisor + helpers, % of a core",
        {c: idle_sum(r, c, ["supervisor", "helpers"], "cpu_pct_of_core") for c, _ in COLS}, 4)
    row("RSS supervisor (KiB)", {c: idle_sum(r, c, ["supervisor"], "rss_kib") for c, _ in COLS}, 0)
    row("RSS supervisor + helpers (KiB)", {c: idle_sum(r, c, ["supervisor", "helpers"], "rss_kib") for c, _ in COLS}, 0)
    row("RSS of the 30 workers, summed (KiB)", {"ours_workers": idle_sum(r, "ours_workers", ["workers"], "rss_kib")}, 0,
        False)
    n = r["settings"]["flood_lines"]
    row(f"log: {n:,} lines on disk (s)", {c: g(r, "flood", c, "secs") for c, _ in COLS}, 3)
    row("log: supervisor + logger CPU (ms)", {c: g(r, "flood", c, "supervisor_cpu_ms") for c, _ in COLS}, 0)
    row("log: lines lost", {c: g(r, "flood", c, "lost") for c, _ in COLS}, 0, False)
    row("log: timestamped", {"ours": "yes", "supervisord": "no", "s6": "yes (s6-log T)",
                             "runit": "yes (svlogd -tt)"}, 0, False)
    row("status of one daemon, median (ms)", {c: g(r, "status_one_ms", c, "median") for c, _ in COLS}, 2)
    row("status of all 30, median (ms)", {c: g(r, "status_all_ms", c, "median") for c, _ in COLS}, 2)
    row("stop stubborn daemon + grandchild (s)", {c: g(r, "stop_stubborn", c, "secs") for c, _ in COLS}, 3)

    def left(c):
        v = g(r, "stop_stubborn", c, "left_1s_later")
        return None if v is None else (", ".join(v) if v else "none")

    row("processes of its tree left after the stop", {c: left(c) for c, _ in COLS}, 0, False)
    if "ours_same_script" in r["metrics"].get("stop_stubborn", {}):
        s = r["metrics"]["stop_stubborn"]["ours_same_script"]
        row("… ours with the peers' shell script (s / left)",
            {"ours": f"{s['secs']:.3f} / {', '.join(s['left_1s_later']) or 'none'}"}, 0, False)
    return out


def ratio(values, ours_col):
    o = values.get(ours_col)
    peers = [values[p] for p in PEERS if isinstance(values.get(p), (int, float))]
    if not isinstance(o, (int, float)) or not peers:
        return "–"
    best = min(peers)
    if best == 0:
        return "both 0" if o == 0 else "∞ (best peer 0)"
    return f"{o / best:.2f}×"


def table(r):
    head = ["metric"] + [name for _, name in COLS] + ["ours ÷ best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, values, digits, rat, ours_col in rows(r):
        cells = [fmt(values.get(c), digits) for c, _ in COLS]
        lines.append("| " + " | ".join([label] + cells + [ratio(values, ours_col) if rat else "–"]) + " |")
    return "\n".join(lines)


def goals(r):
    out = []

    def goal(text, ok, figure):
        out.append((text, None if ok is None else ("met" if ok else "MISSED"), figure))

    ours_rs = g(r, "restart_new_pid_ms", "ours", "median")
    runit_rs = g(r, "restart_new_pid_ms", "runit", "median")
    goal("restart to a new pid no slower than runit (median)",
         None if ours_rs is None or runit_rs is None else ours_rs <= runit_rs,
         f"{fmt(ours_rs, 2)} ms vs runit {fmt(runit_rs, 2)} ms")
    run = g(r, "restart_running_ms", "ours_workers", "median")
    p95 = g(r, "restart_running_ms", "ours_workers", "p95")
    goal("restart to RUNNING after the handshake < 10 ms (median)", None if run is None else run < 10,
         f"median {fmt(run, 2)} ms, p95 {fmt(p95, 2)} ms")
    st = g(r, "status_all_ms", "ours", "median")
    st1 = g(r, "status_one_ms", "ours", "median")
    base = r.get("status_baseline_true_ms")
    goal("`status` round trip ≤ 1 ms (median, fork+exec+wait of the CLI)", None if st is None else st <= 1,
         f"all 30: {fmt(st, 2)} ms, one: {fmt(st1, 2)} ms (`/bin/true` alone: {fmt(base, 2)} ms)")
    cs = g(r, "cold_start_ms", "ours", "median")
    goal("30 external children up ≤ 145 ms", None if cs is None else cs <= 145, f"{fmt(cs)} ms")
    cw = g(r, "cold_start_ms", "ours_workers", "median")
    goal("30 workers RUNNING ≤ 300 ms", None if cw is None else cw <= 300, f"{fmt(cw)} ms")
    secs = r["settings"]["idle_secs"]
    t = idle_sum(r, "ours", ["supervisor"], "ticks")
    ms = idle_sum(r, "ours", ["supervisor"], "cpu_ms")
    goal(f"30 external children: no supervisor CPU tick in {secs:.0f} idle s", None if t is None else t == 0,
         f"{fmt(t, 0)} ticks ({fmt(ms, 3)} ms)")
    pw = idle_sum(r, "ours_workers", ["supervisor"], "cpu_pct_of_core")
    pt = idle_sum(r, "ours_workers", ["supervisor", "workers"], "cpu_pct_of_core")
    goal("30 heartbeating workers: supervisor < 0.1 % of a core", None if pw is None else pw < 0.1,
         f"supervisor {fmt(pw, 4)} %; supervisor + all 30 workers {fmt(pt, 4)} %")
    r1 = idle_sum(r, "ours", ["supervisor"], "rss_kib")
    r2 = idle_sum(r, "ours_workers", ["supervisor"], "rss_kib")
    rmax = max([x for x in (r1, r2) if x is not None], default=None)
    goal("supervisor RSS < 8 MiB (8192 KiB)", None if rmax is None else rmax < 8192,
         f"{fmt(r1, 0)} KiB with external children, {fmt(r2, 0)} KiB with workers")
    fl = g(r, "flood", "ours", "secs")
    lost = g(r, "flood", "ours", "lost")
    goal(f"{r['settings']['flood_lines']:,} timestamped lines on disk ≤ 0.6 s, none lost",
         None if fl is None else (fl <= 0.6 and lost == 0), f"{fmt(fl, 3)} s, {fmt(lost, 0)} lost")
    sp = g(r, "stop_stubborn", "ours", "secs")
    left = g(r, "stop_stubborn", "ours", "left_1s_later")
    goal("stubborn daemon with a grandchild gone entirely after its grace period (1 s)",
         None if sp is None else (not left and sp < 1.5),
         f"stop took {fmt(sp, 3)} s, left: {', '.join(left) if left else 'nothing'}")
    lines = ["| goal | result | figure |", "|---|---|---|"]
    for text, ok, fig in out:
        lines.append(f"| {text} | {ok or 'not measured'} | {fig} |")
    return "\n".join(lines)


def render(r):
    return table(r) + "\n\n" + goals(r)


SETTINGS = """\
Every supervisor runs the same child: `bench/bchild.c` compiled at bench time, a C program that only
calls `pause()` (no protocol, no output). `ringrift-worker fault --no-protocol --flood N` is the log
writer for everyone, and the stubborn daemon is the shell script below for the peers.

| | restart settings (the fastest each allows) | stop settings | logs |
|---|---|---|---|
| ours | `backoff_initial: 0` (default 100 ms; 0 is the fastest allowed), `max_restarts: 1000`, `restart_window: 60`, `heartbeat_interval: 5` | `grace_period: 1` (SIGTERM, 1 s, SIGKILL to the process group) | `logs: {max_bytes: 200000000, max_files: 2}`, timestamped lines |
| supervisord | `autorestart=true`, `startsecs=0`, `startretries=1000000` | `stopwaitsecs=1`, `stopasgroup=true`, `killasgroup=true` | `stdout_logfile=…`, `stdout_logfile_maxbytes=0` (no rotation) |
| s6 | restarts immediately; s6-supervise has a built-in 1 s throttle between a death and the next spawn that no file in the service directory lowers (observed: every restart 1.00–1.02 s, also with 3 s between kills) | `timeout-kill` = 1000 ms; `s6-svc -wD -d` | `log/run`: `s6-log -b n2 s200000000 T` (ISO 8601 stamps) |
| runit | restarts immediately; runsv sleeps 1 s only when `./run` lived < 1 s (not hit: kills are 1.2 s apart) | `sv -w 1 force-stop` (TERM+CONT, 1 s, KILL) | `log/run`: `svlogd -tt`, `config`: `s200000000`, `n2` |

Peers' `./run` is a symlink to the same `bchild` binary (no shell in between); runsvdir gets `-P`.
Kills of the restart test are spaced 1.2 s apart for everyone (BENCH_KILL_GAP), so that runsv's
"lived < 1 s" rule is not what is measured. Cold start waits 1.1 s after writing the service
directories before launching (for everyone): runsvdir postpones its first scan by a second when the
directory's mtime is the current second, an artefact of creating it just before.
The stubborn peer daemon: `trap '' TERM; sleep 1000 & while :; do sleep 1; done` (ours: `ringrift-worker
fault --no-protocol --ignore-sigterm --grandchild`, and also the same script, second line).

How each figure is taken: cold start = from launching the supervisor until all 30 children have exec'd
(polling /proc every 0.5 ms); for ours, the wall time of `ringrift-supervisor start d01 … d30`, which boots
the supervisor and returns once every daemon is RUNNING (workers: after their hello/welcome handshake).
Restart = from `kill -9` of the child until a new child of the same parent (supervisor, s6-supervise or
runsv) has exec'd, busy-polling /proc; for workers, also until `status` (on an open socket) shows
RUNNING with a new pid. Idle = utime+stime ticks and schedstat run time of the supervisor (and of
s6-supervise / runsv helpers, summed) over the idle window, all five setups side by side; RSS = VmRSS
at its end. Log = from the writer's exec (it stamps CLOCK_REALTIME, then execs the writer) until the
log file ends with `flood done`; every line is then checked (numbered, intact, in order). Status =
fork+exec+wait of the command by a C timer (`bchild time`), no Python in the loop. Stop = wall time of
the stop command; then every process of the daemon's tree (pid, descendants, its process group) is
checked by pid and start time.
"""


def write_table_md(r, path):
    m = r["machine"]
    v = m.get("versions", {})
    parts = [
        "# Benchmark: ringrift-supervisor, supervisord, s6, runit",
        "",
        "Generated by `bench/run.sh` (bench/bench.py); raw data in `bench/results/latest.json`.",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu']}, {m['mem_total_kib'] // 1024} MiB RAM, Linux {m['kernel']}; "
        f"run {m['date']}, {r.get('elapsed_secs', 0):.0f} s in all. "
        f"Versions: {v.get('ringrift-supervisor', '?')}, supervisor {v.get('supervisor', '?')}, "
        f"s6 {v.get('s6', '?')}, runit {v.get('runit', '?')}. Load average at start "
        f"{' '.join(m.get('loadavg_at_start', ['?']))}, at end {' '.join(m.get('loadavg_at_end', ['?']))} "
        "(the machine is shared: other builds and tests may run during the benchmark).",
        f"N = {r['settings']['N']} daemons, {r['settings']['kills']} kills, {r['settings']['status_reps']} status "
        f"calls, idle {r['settings']['idle_secs']:.0f} s. Lower is better everywhere; the last column divides "
        "ours (external children) by the best peer.",
        "",
        table(r),
        "",
        "## Goals",
        "",
        goals(r),
        "",
        "## Settings and method",
        "",
        SETTINGS,
    ]
    if r.get("notes"):
        parts += ["## Notes from the run", ""] + [f"- {n}" for n in r["notes"]] + [""]
    findings = os.path.join(HERE, "FINDINGS.md")
    if os.path.exists(findings):
        parts += [open(findings).read()]
    with open(path, "w") as f:
        f.write("\n".join(parts).rstrip() + "\n")


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "latest.json")
    res = json.load(open(src))
    print(render(res))
    write_table_md(res, os.path.join(HERE, "TABLE.md"))
