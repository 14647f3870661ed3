#!/usr/bin/env bash
# The main job: set up what is missing, then run the demo (train, re-parameterize, port).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_envs.sh
exec .venv/bin/reparam demo "$@"
