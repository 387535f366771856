#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv and install comfyfleet into it
# (editable, with the test tools). Re-installs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The dashboard's browser test drives Debian's Chromium (never a downloaded browser).
if [ "${1:-}" = "--with-browser" ] && [ ! -x /usr/bin/chromium ]; then
    echo "installing Debian's chromium for the browser tests"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "comfyfleet needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.comfyfleet-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing comfyfleet and its dependencies into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    echo "$want" > "$stamp"
fi
