#!/usr/bin/env bash
# The wheels the offline GPU host needs (benchmarks/gpu_host_wheels.py says which and why),
# into ./.whl. Run from the project root after `make install`; pass --peer for the peer.
# On the host, before anything else:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/server:$PWD/client
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
exec .venv/bin/python benchmarks/gpu_host_wheels.py "$@"
