#!/usr/bin/env bash
# The whole test suite once per backend, each in its own pytest process. Extra arguments go
# to pytest (e.g. `-m slow`, `-k resampler`). Fails if any backend fails.
#
# The backends run side by side (TEST_JOBS at a time, default all of them): one pytest process
# keeps about 1.1 of this machine's 2 cores busy (Python dispatch, tracing, conversion,
# subprocess start-up), so three together finish well before three in a row. Each log is
# printed whole when its backend ends. TEST_JOBS=1 runs them one after another.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export TF_CPP_MIN_LOG_LEVEL=3
backends=(${BACKENDS:-jax tensorflow torch})
jobs_at_once="${TEST_JOBS:-${#backends[@]}}"
if ! [[ "$jobs_at_once" =~ ^[1-9][0-9]*$ ]]; then
  echo "TEST_JOBS: expected a positive integer; received '$jobs_at_once'" >&2
  exit 2
fi
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

run_backend() {
  local backend="$1" start=$SECONDS
  shift
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -q -p no:cacheprovider --durations=12 "$@" \
    > "$logs/$backend.log" 2>&1
  local status=$?
  echo "$status $(( SECONDS - start ))" > "$logs/$backend.status"
}

for backend in "${backends[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_at_once" ]; do wait -n; done
  echo "=== KERAS_BACKEND=$backend started"
  run_backend "$backend" "$@" &
done
wait

failed=()
for backend in "${backends[@]}"; do
  read -r status seconds < "$logs/$backend.status"
  echo "=== KERAS_BACKEND=$backend (exit $status, ${seconds} s)"
  cat "$logs/$backend.log"
  [ "$status" -eq 0 ] || failed+=("$backend")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED backends: ${failed[*]}"
  exit 1
fi
echo "all backends passed"
