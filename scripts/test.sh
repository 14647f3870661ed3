#!/usr/bin/env bash
# Run every test: sets up both environments first (idempotent), lints (ruff), checks types (mypy), then, side by side,
#   .venv-mge (Python 3.10, numpy 1.26): reparam_core tests + the MegEngine backend suite
#   .venv     (Python 3.11, numpy 2):    reparam_core tests + torch, flax, backends (all 3 backends,
#                                         MegEngine through its worker), convert, bench, demo and
#                                         reliability and families suites + the parity matrix (all 3 backends)
#   and, in the second lane after the MegEngine suite, .venv's tests/train (reparam train)
# The two lanes share nothing but the CPU; the second lane's output is printed after the first's.
# Extra arguments go to both pytest runs (e.g. --slow, -x, -k expr).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_envs.sh || exit 1

# Fast checks first, before any suite: lint and format (ruff) and types (mypy), all configured in
# pyproject.toml; style fails in seconds, types in about a minute.
echo "== lint: ruff check . && ruff format --check ."
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
echo "== types: mypy (strict on reparam_core; backends, scripts, parity_tests checked)"
.venv/bin/python -m mypy || exit 1

# Second lane, beside the main one (the MegEngine suite is shorter): .venv-mge's suite, then the
# trainer's tests (.venv; their torchrun/XLA subprocesses use one OpenMP thread each).
lane_log="$(mktemp)"
trap 'rm -f "$lane_log"' EXIT
(
    lane=0
    echo "== .venv-mge: reparam_core + MegEngine backend (Python 3.10, numpy<2)"
    .venv-mge/bin/python -m pytest -q -p no:cacheprovider tests/core tests/megengine "$@" || lane=1
    echo "== .venv: reparam train (torch DDP, Flax sharding, resume, ports)"
    .venv/bin/python -m pytest -q -p no:cacheprovider tests/train "$@" || lane=1
    exit $lane
) >"$lane_log" 2>&1 &
lane_pid=$!

status=0
echo "== .venv: reparam_core + torch + flax + backends + convert + bench + demo + reliability + quantize + families + graphfuse + parity matrix (Python 3.11, numpy 2)"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/core tests/cli tests/torch tests/flax tests/backends \
    tests/convert tests/bench tests/demo tests/reliability tests/quantize tests/families \
    tests/graphfuse parity_tests "$@" || status=1
wait "$lane_pid" || status=1
cat "$lane_log"
exit $status
