#!/bin/sh
# The cluster benchmark (issue 12): builds the release binaries and bench/natsbench.rs (an example,
# not part of the supervisor), then runs bench/cluster.py, which starts NATS servers (1, then 3) and
# three supervisor nodes in a temporary directory, measures, prints the table and writes
# bench/results/cluster-latest.json. Needs nats-server (Debian: apt-get install nats-server).
#   BENCH_NO_BUILD=1 bench/cluster.sh   # use the binaries already built (CARGO_TARGET_DIR or target/)
# Bounded: cluster.py stops itself (and everything it started) after CLUSTER_TIMEOUT (480 s); the
# outer timeout is a second line of defence.
set -eu
cd "$(dirname "$0")/.."
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    cargo build --release --bins --example natsbench >&2
fi
exec timeout -k 10 540 python3 bench/cluster.py
