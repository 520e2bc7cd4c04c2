#!/bin/sh
# Builds the release binaries, then runs bench/soak.py (SOAK_SECS, default 180 s; bounded).
set -eu
cd "$(dirname "$0")/.."
cargo build --release --bins >&2
exec timeout -k 10 "$(( ${SOAK_SECS:-180} + 240 ))" python3 bench/soak.py
