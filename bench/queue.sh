#!/bin/sh
# The shared work queue benchmark (issue 13): builds the release binaries, then runs
# bench/queue.py, which starts a NATS server and three supervisor nodes in a temporary directory,
# measures slot utilisation, claim-to-start latency and redelivery after a node dies, prints the
# table and writes bench/results/queue-latest.json. Needs nats-server (apt-get install nats-server).
#   BENCH_NO_BUILD=1 bench/queue.sh   # use the binaries already built (CARGO_TARGET_DIR or target/)
# Bounded: queue.py stops itself (and everything it started) after QUEUE_TIMEOUT (300 s); the
# outer timeout is a second line of defence.
set -eu
cd "$(dirname "$0")/.."
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    cargo build --release --bins >&2
fi
exec timeout -k 10 360 python3 bench/queue.py
