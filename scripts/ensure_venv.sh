#!/usr/bin/env bash
# Create or reuse .venv in the repository root and install the package with everything the
# main job and the tests need. A second run installs nothing (a stamp records what was
# installed; editing pyproject.toml or this file triggers a re-install).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.keras-perceiver-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/ensure_venv.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# PyTorch CPU build first, so the `torch>=` range below is already met and pip does not
# pull a multi-GB CUDA build: the wheel on this machine's disk when there is one, else
# PyTorch's CPU index on Linux.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  wheel="$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)"
  if [ -n "$wheel" ]; then
    "${pip[@]}" "$wheel"
  elif [ "$(uname -s)" = Linux ]; then
    "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  else
    "${pip[@]}" torch
  fi
fi
"${pip[@]}" -e "$root[test]"
echo "$want" > "$stamp"
