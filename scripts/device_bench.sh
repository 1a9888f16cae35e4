#!/usr/bin/env bash
# The GPU rows of the benchmark matrix, on a machine that has an NVIDIA GPU, PyTorch, JAX and
# transformers installed but no package index: Keras, keras_perceiver, flamingo-pytorch and their
# missing needs travel as wheels in .whl/ (see benchmarks/NOTES.md, "GPU"). Arguments go to
# `keras-perceiver bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# the parent process needs a backend without TensorFlow (Keras defaults to it); each run sets its own
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 KERAS_BACKEND=${KERAS_BACKEND:-torch}
cd /tmp  # import the installed keras_perceiver (its converters and zoo live outside the source folder)
python3 -m keras_perceiver bench "$@"
