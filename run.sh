#!/usr/bin/env bash
# ./run.sh main [demo args]   the main job (see README)
# ./run.sh test [pytest args] the whole test suite, once per backend
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/ensure_venv.sh
export TF_CPP_MIN_LOG_LEVEL=3
command="${1:-main}"
shift || true
case "$command" in
  main) exec .venv/bin/keras-perceiver demo --backends all "$@" ;;
  test) exec bash scripts/test_all_backends.sh "$@" ;;
  *) echo "usage: ./run.sh main|test [args]; received '$command'" >&2; exit 2 ;;
esac
