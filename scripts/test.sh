#!/usr/bin/env bash
# Run every test: sets up both environments first (idempotent), then
#   .venv-mge (Python 3.10, numpy 1.26): reparam_core tests + the MegEngine backend suite
#   .venv     (Python 3.11, numpy 2):    reparam_core tests + torch, flax, convert suites + parity matrix
# Extra arguments go to both pytest runs (e.g. --slow, -x, -k expr).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_envs.sh || exit 1

status=0
echo "== .venv-mge: reparam_core + MegEngine backend (Python 3.10, numpy<2)"
.venv-mge/bin/python -m pytest -q -p no:cacheprovider tests/core tests/megengine "$@" || status=1
echo "== .venv: reparam_core + torch + flax + convert + parity matrix (Python 3.11, numpy 2)"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/core tests/torch tests/flax tests/convert parity_tests "$@" || status=1
exit $status
