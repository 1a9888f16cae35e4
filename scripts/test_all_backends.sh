#!/usr/bin/env bash
# The whole test suite once per backend, each in its own pytest process. Extra arguments go
# to pytest (e.g. `-m slow`, `-k resampler`). Fails if any backend fails.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export TF_CPP_MIN_LOG_LEVEL=3
failed=()
for backend in ${BACKENDS:-jax tensorflow torch}; do
  echo "=== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -q -p no:cacheprovider --durations=12 "$@" || failed+=("$backend")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED backends: ${failed[*]}"
  exit 1
fi
echo "all backends passed"
