#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv and install comfyfleet into it
# (editable, with the test tools). Re-installs only when pyproject.toml changed.
#   --with-browser    also Debian's chromium, for the dashboard's browser test
#   --with-postgres   also Debian's postgresql, for the tests that run the store on PostgreSQL
#   --with-nginx      also Debian's nginx, for the tests of the control plane behind it
#   --runtime         only what comfyfleet needs to run (the demo), not the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

with_browser=0
with_postgres=0
with_nginx=0
runtime_only=0
for arg in "$@"; do
    case "$arg" in
        --with-browser) with_browser=1 ;;
        --with-postgres) with_postgres=1 ;;
        --with-nginx) with_nginx=1 ;;
        --runtime) runtime_only=1 ;;
        *) echo "bootstrap.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done

apt_install() {
    local sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    # Set-ups running side by side take turns (apt-get update does not wait for its lock);
    # any other apt is waited for by the install's own lock timeout.
    (
        flock -w 600 9
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get -o DPkg::Lock::Timeout=300 install -y -qq "$@" >/dev/null
    ) 9>"${TMPDIR:-/tmp}/comfyfleet-apt.lock"
}

# Never a downloaded browser: Playwright drives the system's Chromium.
if [ "$with_browser" = 1 ] && [ ! -x /usr/bin/chromium ]; then
    echo "installing Debian's chromium for the browser tests"
    apt_install chromium
fi
# The tests start their own throwaway server from these binaries; none is left running.
if [ "$with_postgres" = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "installing Debian's postgresql for the database tests"
    apt_install postgresql
fi

# The tests start their own nginx on a free port; the package's own service is not used.
if [ "$with_nginx" = 1 ] && [ ! -x /usr/sbin/nginx ]; then
    echo "installing Debian's nginx for the load-balancer tests"
    apt_install nginx-light
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
# The stamp says what was installed for which pyproject.toml: "dev <hash>" or "runtime <hash>";
# a dev install has everything a runtime one needs.
stamp=.venv/.comfyfleet-installed
hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$runtime_only" = 1 ]; then
    kind=runtime extras='' what="comfyfleet and what it needs to run"
else
    kind=dev extras='[dev]' what="comfyfleet, what it needs to run and its test tools"
fi
if [ "$have" != "$kind $hash" ] && [ "$have" != "dev $hash" ]; then
    echo "installing $what into .venv (a minute or two the first time) ..."
    started=$(date +%s)
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".$extras"
    echo "installed in $(( $(date +%s) - started )) s"
    echo "$kind $hash" > "$stamp"
fi
