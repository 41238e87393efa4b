#!/usr/bin/env bash
# Set up (system packages, .venv with the test extras) and run the lint and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
