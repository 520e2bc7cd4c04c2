#!/bin/sh
# One command for the whole benchmark (issue 5): builds the release binaries, then runs bench/bench.py,
# which installs missing peers (supervisor, s6, runit) with apt-get, measures, prints the table and
# writes bench/results/latest.json, a dated copy and bench/TABLE.md.
#   BENCH_IDLE_SECS=5 bench/run.sh     # quick run (see bench/bench.py for every knob)
#   BENCH_NO_BUILD=1 bench/run.sh      # use the binaries already in target/release
# Bounded: bench.py stops itself (and everything it started) after BENCH_TIMEOUT (840 s); the outer
# timeout is a second line of defence.
set -eu
cd "$(dirname "$0")/.."
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    if ! cargo build --release --bins >&2; then
        if [ -x target/release/ringrift-supervisor ] && [ -x target/release/ringrift-worker ]; then
            echo "run.sh: cargo build failed; benchmarking the binaries already in target/release" >&2
        else
            exit 1
        fi
    fi
fi
exec timeout -k 10 900 python3 bench/bench.py
