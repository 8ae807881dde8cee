#!/usr/bin/env bash
# The wheels an offline GPU host needs for benchmarks/gpu.py: ../shared/gpu-host/wheels.sh
# (pass --peer for the peer), plus what lmserve needs since that script was written:
# llguidance (structured output; the daemon imports it at start), at this .venv's version.
# Run from the project root after `make install`; carry .whl to the host and install as that
# script's header says.
set -euo pipefail
cd "$(dirname "$0")/.."
../shared/gpu-host/wheels.sh "$@"
v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('llguidance'))")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl "llguidance==$v"  # 1.9 wheels are manylinux_2_31: glibc 2.31 or newer
ls .whl | grep -i llguidance
