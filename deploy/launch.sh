#!/usr/bin/env bash
# Start the pipeline (predictor, prefetch and compute processes behind one front end) and keep
# it in the foreground: it prints `ready ENDPOINT` once every stage is up, restarts a stage that
# dies, and stops them all on SIGINT/SIGTERM.
#   deploy/launch.sh [CONFIG] [streamer serve options...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="${1:-$here/deploy/pipeline.toml}"
shift || true
streamer="${STREAMER:-$here/.venv/bin/streamer}"
exec "$streamer" serve --config "$config" "$@"
