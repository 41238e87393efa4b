#!/usr/bin/env bash
# Set up (only what is missing or changed: see setup.sh) and start the service on its embedded
# default: SQLite index and files under ./data, DICOM on 127.0.0.1:11112 (AE PASSERELLE), HTTP
# on 127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/passerelle serve "$@"
