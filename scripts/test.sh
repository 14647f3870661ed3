#!/usr/bin/env bash
# Run every test: sets up both environments first (idempotent), lints (ruff), checks types (mypy), then
# two lanes side by side, each a sequence of pytest processes, one per group of suites (issue 28: one
# process over every .venv suite reached 10.6 GB resident; each group stays under 4 GB):
#   second lane: .venv-mge (Python 3.10, numpy 1.26): reparam_core tests + the MegEngine backend
#                suite; then .venv's tests/train (reparam train: torch DDP, Flax sharding, resume,
#                ports); then shared groups, like the main lane
#   main lane:   the shared groups (.venv, Python 3.11, numpy 2): reparam_core tests + torch, flax,
#                backends (all 3 backends, MegEngine through its worker), convert, bench, demo,
#                reliability, quantize, families and graphfuse suites + the parity matrix
# Each shared group is run once, by whichever lane is free first (in the order listed), which keeps
# the lanes level whatever the machine's load. The main lane's output is printed as it runs, the
# second lane's after it, then every pytest process's closing summary line again, one a line.
# Exit status: non-zero if a check or any pytest process failed. Memory and time per process:
# scripts/ci_profile.sh. Extra arguments go to every pytest run (e.g. --slow, -x, -k expr).
# REPARAM_SKIP_SETUP=1 skips the environment setup (environments shared with another checkout).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ "${REPARAM_SKIP_SETUP:-}" != 1 ]; then
    bash scripts/setup_envs.sh || exit 1
fi

# Fast checks first, before any suite: lint and format (ruff) and types (mypy), all configured in
# pyproject.toml; style fails in seconds, types in about a minute.
echo "== lint: ruff check . && ruff format --check ."
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
echo "== types: mypy (strict on reparam_core; backends, scripts, parity_tests checked)"
.venv/bin/python -m mypy || exit 1

# "ENV PATH...": one pytest process each. The second lane's own groups first (the MegEngine suite
# needs .venv-mge); the shared groups longest first, so that the last one to start is short.
SECOND_GROUPS=(
    ".venv-mge tests/core tests/megengine"
    ".venv tests/train"
)
SHARED_GROUPS=(
    ".venv tests/backends"
    ".venv parity_tests"
    ".venv tests/bench tests/demo tests/families"
    ".venv tests/flax tests/convert tests/quantize tests/zoo"
    ".venv tests/core tests/cli tests/torch tests/reliability tests/graphfuse"
)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# run_group SUMMARY_FILE "ENV PATHS" PYTEST_ARGS...: one pytest process; appends
# "ENV PATHS: <pytest's closing summary line>" to SUMMARY_FILE; its exit status.
run_group() {
    local summary="$1" env paths log rc line
    read -r env paths <<<"$2"
    shift 2
    echo "== $env: $paths"
    log="$tmp/pytest.$BASHPID.log"
    # shellcheck disable=SC2086 # paths: one word per test directory
    "$env/bin/python" -m pytest -q -p no:cacheprovider $paths "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    line="$(grep -E '(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s' "$log" | tail -n 1 |
        sed -E 's/^=+ //; s/ =+$//')"
    echo "$env $paths: ${line:-no summary line (exit status $rc)}" >>"$summary"
    return "$rc"
}

# lane SUMMARY_FILE [OWN_GROUP...] -- PYTEST_ARGS...: the lane's own groups, then every shared
# group that no lane has taken yet (mkdir is atomic: the first lane to create claim.N runs group N).
lane() {
    local summary="$1" status=0 group i
    shift
    local own=()
    while [ "$1" != "--" ]; do
        own+=("$1")
        shift
    done
    shift
    for group in "${own[@]}"; do
        run_group "$summary" "$group" "$@" || status=1
    done
    for i in "${!SHARED_GROUPS[@]}"; do
        mkdir "$tmp/claim.$i" 2>/dev/null || continue
        run_group "$summary" "${SHARED_GROUPS[$i]}" "$@" || status=1
    done
    return $status
}

lane "$tmp/second.summary" "${SECOND_GROUPS[@]}" -- "$@" >"$tmp/second.log" 2>&1 &
lane_pid=$!

status=0
lane "$tmp/main.summary" -- "$@" || status=1
wait "$lane_pid" || status=1
echo "== second lane (run beside the above)"
cat "$tmp/second.log"
echo "== summary: one line per pytest process"
cat "$tmp/main.summary" "$tmp/second.summary" 2>/dev/null
# The totals over every process, as one plain closing line ("N passed, N failed").
cat "$tmp/main.summary" "$tmp/second.summary" 2>/dev/null | awk '
    { for (i = 2; i <= NF; i++) {
          if ($i ~ /^passed/) passed += $(i - 1)
          if ($i ~ /^(failed|errors?)/) failed += $(i - 1)
      } }
    END { printf "%d passed, %d failed\n", passed, failed }'
exit $status
