#!/usr/bin/env bash
# Create or refresh the project's two environments, idempotently:
#   .venv      Python 3.11: torch (CPU), jax, flax, onnx, test tools   (requirements/main.lock)
#              + timm, ultralytics, mmpretrain, torchvision               (requirements/zoo.lock, --no-deps:
#              fully pinned there; resolving would pull GUI opencv; torchvision is imported through
#              backends/torch/zoo.py, see that file)
#   .venv-mge  Python 3.10: megengine 1.13.0, numpy < 2                 (requirements/mge.lock)
# MegEngine's last release has wheels only for CPython <= 3.10 and breaks with numpy 2, hence two.
# A stamp (hash of the lock file and pyproject.toml) in each venv makes a second run a no-op.
# Overrides: REPARAM_PYTHON (3.11 interpreter), REPARAM_MGE_BASE_PYTHON (3.10 interpreter).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

py311="${REPARAM_PYTHON:-$(command -v python3.11 || echo /root/.pyenv/versions/3.11.7/bin/python)}"
py310="${REPARAM_MGE_BASE_PYTHON:-/root/.pyenv/versions/3.10.13/bin/python}"

pip_quiet() {  # run pip, show its output only when it fails
  local log
  log="$(mktemp)"
  if ! "$@" >"$log" 2>&1; then
    grep -v -e "is ignored: it is neither a file nor a directory" "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

make_env() {  # make_env DIR PYTHON LOCKFILE EXTRA [NODEPS_LOCKFILE]
  local dir="$1" python="$2" lock="$3" extra="$4" nodeps_lock="${5:-}"
  local want
  want="$(cat "$lock" ${nodeps_lock:+"$nodeps_lock"} pyproject.toml | sha256sum | cut -c1-16)"
  if [[ -f "$dir/.reparam-stamp" && "$(cat "$dir/.reparam-stamp")" == "$want" ]]; then
    return 0
  fi
  if [[ ! -x "$python" ]] && ! command -v "$python" >/dev/null; then
    echo "setup: $python not found (needed for $dir); set the override variable" >&2
    return 1
  fi
  echo "setup: building $dir with $("$python" --version 2>&1) from $lock (first time only) ..." >&2
  [[ -x "$dir/bin/python" ]] || "$python" -m venv "$dir"
  pip_quiet "$dir/bin/python" -m pip install --disable-pip-version-check -r "$lock"
  if [[ -n "$nodeps_lock" ]]; then  # every package pinned in the file itself; torch stays as $lock put it
    pip_quiet "$dir/bin/python" -m pip install --disable-pip-version-check --no-deps -r "$nodeps_lock"
  fi
  pip_quiet "$dir/bin/python" -m pip install --disable-pip-version-check --no-deps -e ".[$extra]"
  "$dir/bin/python" -c "import reparam_core" || { echo "setup: $dir is broken" >&2; return 1; }
  echo "$want" > "$dir/.reparam-stamp"
}

make_env .venv "$py311" requirements/main.lock "torch,flax,dev" requirements/zoo.lock
make_env .venv-mge "$py310" requirements/mge.lock "megengine"
