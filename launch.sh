#!/usr/bin/env bash
# One entry point for users and CI. On first use it makes a virtual environment (.venv, or
# $WAN_SPMD_VENV) and installs wan_spmd into it with a pinned torch: 2.11.0 for CUDA 13 on a GPU
# machine, exactly 2.13.0 elsewhere (a local CPU wheel where pip is configured with one).
#   ./launch.sh generate --prompt "..." --image examples/example.png   # any wan_spmd command
#   ./launch.sh test [pytest args]                                      # the test suite
#   ./launch.sh torchrun --nproc-per-node 2 -m wan_spmd serve ...       # torchrun from the venv
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${WAN_SPMD_VENV:-$here/.venv}
python=${PYTHON:-python3}

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
extras=test
if [ "$gpu" = 1 ]; then extras=test,gpu; fi
# the install is redone when pyproject.toml changed since (a new dependency reaches old venvs too)
stamp=$(cksum <"$here/pyproject.toml")
if [ ! -f "$venv/.installed" ]; then
  echo "launch.sh: setting up $venv (first use only)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # Pinned per platform. A GPU: the torch the benchmarks ran, built for CUDA 13 (pyproject's `gpu`
  # extra; the NVIDIA driver must be 580 or newer). No GPU: the CPU wheel CI runs (an unpinned or
  # PyPI torch would pull a multi-GB CUDA build onto a CPU-only machine).
  if [ "$gpu" = 1 ]; then
    "$venv/bin/python" -m pip install -q --index-url https://download.pytorch.org/whl/cu130 "torch==2.11.0"
  else
    # Exactly 2.13.0: where pip is configured with a local CPU wheel of it (CI), that is what it takes;
    # elsewhere PyPI's (macOS: a CPU/MPS build). An open range would pull a newer, multi-GB CUDA build.
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
  fi
  "$venv/bin/python" -m pip install -q -e "$here[$extras]"
  echo "$stamp" >"$venv/.installed"
elif [ "$(cat "$venv/.installed")" != "$stamp" ]; then
  echo "launch.sh: pyproject.toml changed; updating $venv" >&2
  "$venv/bin/python" -m pip install -q -e "$here[$extras]"
  echo "$stamp" >"$venv/.installed"
fi

cmd=${1:-}
case "$cmd" in
  # two pytest-xdist workers, each module's tests together on one (tests/conftest.py's groups);
  # `-n 0` after `test` runs them in this process
  test) shift; cd "$here" && exec "$venv/bin/python" -m pytest -n 2 "$@" ;;
  torchrun) shift; exec "$venv/bin/torchrun" "$@" ;;
  "") exec "$venv/bin/wan_spmd" --help ;;
  *) exec "$venv/bin/wan_spmd" "$@" ;;
esac
