#!/usr/bin/env bash
# Run every test: sets up both environments first (idempotent), then, side by side,
#   .venv-mge (Python 3.10, numpy 1.26): reparam_core tests + the MegEngine backend suite
#   .venv     (Python 3.11, numpy 2):    reparam_core tests + torch, flax, backends (all 3 backends,
#                                         MegEngine through its worker), convert, bench, demo and
#                                         reliability and families suites + the parity matrix (all 3 backends)
# The two runs share nothing but the CPU; the MegEngine run's output is printed after the other's.
# Extra arguments go to both pytest runs (e.g. --slow, -x, -k expr).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_envs.sh || exit 1

mge_log="$(mktemp)"
trap 'rm -f "$mge_log"' EXIT
.venv-mge/bin/python -m pytest -q -p no:cacheprovider tests/core tests/megengine "$@" \
    >"$mge_log" 2>&1 &
mge_pid=$!

status=0
echo "== .venv: reparam_core + torch + flax + backends + convert + bench + demo + reliability + quantize + families + graphfuse + train + parity matrix (Python 3.11, numpy 2)"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/core tests/torch tests/flax tests/backends \
    tests/convert tests/bench tests/demo tests/reliability tests/quantize tests/families \
    tests/graphfuse tests/train parity_tests "$@" || status=1
wait "$mge_pid" || status=1
echo "== .venv-mge: reparam_core + MegEngine backend (Python 3.10, numpy<2)"
cat "$mge_log"
exit $status
