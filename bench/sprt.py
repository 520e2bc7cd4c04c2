#!/usr/bin/env python3
"""The promotion gate's false-promotion benchmark (issue 14).

Trains one model with the reference jobs (selfplay, export, train), then runs the gauntlet's
sequential test (`--sprt ELO0,ELO1,ALPHA,BETA`, the embedded default's 0,50,0.05,0.05) many
times with different seeds:

- the model against itself (H0 holds exactly: an equal model): how often the test accepts is
  the false-promotion rate, which Wald's test keeps at or under alpha;
- the model against a barely trained one (clearly stronger): how often it accepts, and after
  how many games.

Each run may play up to MAX_GAMES games against the baseline; one that reaches neither bound is
"inconclusive", which the promotion gate counts as a rejection. Prints a table and writes
bench/results/sprt-latest.json. Usage: python3 bench/sprt.py [RUNS] (default 200), with
ringrift-worker built (CARGO_TARGET_DIR or target/, release preferred).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import REPO, machine  # noqa: E402

KEY = "hex8_2p"
SPRT = "0,50,0.05,0.05"
MAX_GAMES = 2000


def worker():
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    for profile in ("release", "debug"):
        path = target / profile / "ringrift-worker"
        if path.exists():
            return path
    sys.exit("build ringrift-worker first (cargo build --release --bins)")


def job(worker_bin, cwd, *args):
    out = subprocess.run([str(worker_bin), "job", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=600, check=False)
    if out.returncode != 0:
        sys.exit(f"job {' '.join(args)} failed: {out.stderr}")
    return json.loads(out.stdout)


def runs(worker_bin, cwd, candidate, baseline, n):
    results = []
    for seed in range(1, n + 1):
        g = job(worker_bin, cwd, "gauntlet", "--config-key", KEY, "--candidate", candidate,
                "--baseline", baseline, "--games", str(MAX_GAMES), "--output", "out.json",
                "--sprt", SPRT, "--seed", str(seed), "--epsilon", "0.1")
        results.append((g["sprt"]["result"], g["games_vs_baseline"]))
    count = {r: sum(1 for x, _ in results if x == r) for r in ("accept", "reject", "inconclusive")}
    games = [g for _, g in results]
    return {
        "runs": n,
        "accepted": count["accept"],
        "rejected": count["reject"],
        "inconclusive": count["inconclusive"],
        "acceptance_rate": round(count["accept"] / n, 4),
        "games_median": statistics.median(games),
        "games_max": max(games),
    }


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    started = time.monotonic()
    worker_bin = worker()
    result = {"machine": machine(), "sprt": SPRT, "max_games": MAX_GAMES, "key": KEY}
    with tempfile.TemporaryDirectory() as tmp:
        job(worker_bin, tmp, "selfplay", "--config-key", KEY, "--games", "300", "--db", "g.db",
            "--seed", "5")
        job(worker_bin, tmp, "export", "--config-key", KEY, "--db", "g.db", "--output", "s.npz")
        job(worker_bin, tmp, "train", "--config-key", KEY, "--input", "s.npz", "--output",
            "model.bin", "--epochs", "10", "--lr", "0.01")
        job(worker_bin, tmp, "train", "--config-key", KEY, "--input", "s.npz", "--output",
            "weak.bin", "--epochs", "1", "--lr", "0.0000001")
        result["equal"] = runs(worker_bin, tmp, "model.bin", "model.bin", n)
        result["stronger"] = runs(worker_bin, tmp, "model.bin", "weak.bin", n)
    result["machine"]["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    result["elapsed_secs"] = round(time.monotonic() - started, 1)
    out = REPO / "bench" / "results" / "sprt-latest.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(f"Machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}; run {m['date']}, "
          f"{result['elapsed_secs']:.0f} s.")
    print(f"\nSPRT {SPRT} (elo0,elo1,alpha,beta), at most {MAX_GAMES} games, {n} seeds each:\n")
    print("| match | accepted (promoted) | rejected | inconclusive | games, median | games, max |")
    print("|---|---|---|---|---|---|")
    for name, label in (("equal", "model vs itself (false promotion)"),
                        ("stronger", "model vs barely trained one")):
        r = result[name]
        print(f"| {label} | {r['accepted']} ({100 * r['acceptance_rate']:.1f} %) | {r['rejected']} "
              f"| {r['inconclusive']} | {r['games_median']:.0f} | {r['games_max']} |")
    print(f"\nsaved {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
