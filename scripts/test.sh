#!/usr/bin/env bash
# The test command: sets itself up, checks lint and formatting, generated code and the API's buf lint,
# runs the default suite (tests marked `slow` are excluded; run them with: scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup.sh | tail -n 1)"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" proto/generate.py --check
"$VENV/bin/buf" lint proto  # the API against buf's STANDARD rules (proto/buf.yaml)
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec "$VENV/bin/python" -m pytest -q --durations=25 "$@"
