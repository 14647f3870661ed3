#!/usr/bin/env bash
# Profile the test suites' wall time and memory (issue 28), CI=true, as scripts/test.sh runs them:
#   bash scripts/ci_profile.sh suites OUT.md [--serial] [-- PYTEST_ARGS]
#       each test directory of both lanes as its own pytest process (.venv: the main lane's
#       directories; .venv-mge: tests/core, tests/megengine; .venv: tests/train), the two lanes'
#       queues side by side as in test.sh (--serial: one at a time, for quieter wall times)
#   bash scripts/ci_profile.sh lanes OUT.md [-- TEST_SH_ARGS]
#       scripts/test.sh itself (lint, types, both lanes; REPARAM_SKIP_SETUP=1: the environments
#       as they are): one row per pytest process it starts, to compare layouts before and after
# Prints a markdown table (wall s, peak RSS MB of each pytest process and of its children,
# passed/failed/errors/skipped/deselected, load average at the start and end of each row) and
# writes it to OUT.md (raw figures, per test file RSS growth included, in OUT.json); the pytest
# logs stay in a ci_profile_* folder beside OUT.md. Exit status: non-zero if any run failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ $# -lt 2 ]; then
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
fi
exec .venv/bin/python scripts/ci_profile.py "$@"
