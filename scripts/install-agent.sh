#!/usr/bin/env bash
# Install the comfyfleet runner agent as a systemd service, or remove it again.
#
#   install-agent.sh install --server URL (--token-file FILE | --token TOKEN) --comfyui URL
#       [--comfyui URL ...] [--comfyui-gpu INDEX ...] [--comfyui-cmd CMD ...] [--user USER]
#       [--venv PATH] [--shutdown-grace SECONDS] [--log-json] [--root DIR]
#   install-agent.sh uninstall [--root DIR]
#
# Prefer --token-file: a --token on the command line is visible to every user in ps.
#
# install writes /etc/comfyfleet/agent.toml (0640), /etc/comfyfleet/agent.token (0600, the
# only copy of the token it keeps) and /etc/systemd/system/comfyfleet-agent.service, then
# enables and starts the service. Running it again replaces them and restarts the service.
# uninstall stops and disables the service and removes those files and the agent's work
# folder /var/lib/comfyfleet-agent.
#
# --root DIR puts every file under DIR and leaves systemd alone (tests, image builds).
# Exit status: 0 done, 2 bad or missing options, 1 anything else.
set -euo pipefail

UNIT_NAME=comfyfleet-agent.service
CONF_DIR=/etc/comfyfleet
CONFIG=$CONF_DIR/agent.toml
TOKEN_FILE=$CONF_DIR/agent.token
UNIT_FILE=/etc/systemd/system/$UNIT_NAME
STATE_DIR=/var/lib/comfyfleet-agent
# The agent's own comfyui_stop_grace_s default: ComfyUI's time between SIGTERM and SIGKILL.
COMFYUI_STOP_GRACE_S=10

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

usage_error() {
    echo "install-agent.sh: $*" >&2
    echo "run 'install-agent.sh --help' for the options" >&2
    exit 2
}

fail() {
    echo "install-agent.sh: $*" >&2
    exit 1
}

# Control characters have no place in any setting, and would break the files written.
check_plain() {
    local value
    for value in "$@"; do
        case $value in
            *[[:cntrl:]]*) usage_error "a value holds a control character (newline, tab ...): $(printf '%q' "$value")" ;;
        esac
    done
}

# A TOML basic string (the values were checked with check_plain).
toml_string() {
    local value=$1
    value=${value//\\/\\\\}
    value=${value//\"/\\\"}
    printf '"%s"' "$value"
}

toml_string_array() {
    local sep="" item
    printf '['
    for item in "$@"; do
        printf '%s%s' "$sep" "$(toml_string "$item")"
        sep=", "
    done
    printf ']'
}

need_value() {
    # $1: the option, $2: how many arguments are left including it
    [ "$2" -ge 2 ] || usage_error "$1 needs a value"
}

# Writes stdin to $1 with mode $2, atomically: the file is never there half-written, and a
# secret is never readable by others, not even for a moment.
write_file() {
    local path=$1 mode=$2 tmp
    tmp=$(umask 077 && mktemp "$(dirname "$path")/.$(basename "$path").XXXXXX")
    cat > "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$path"
}

have_systemd() {
    [ -z "$ROOT" ] && command -v systemctl > /dev/null 2>&1
}

require_root_user() {
    if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
        fail "run as root (sudo) to $1 a system service, or pass --root DIR to work under DIR"
    fi
}

cmd_install() {
    local server="" token="" token_source="" user="" venv="" grace=30 log_json=false
    local -a comfyui=() gpus=() cmds=()
    while [ $# -gt 0 ]; do
        case $1 in
            --server) need_value "$1" $#; server=$2; shift 2 ;;
            --token)
                need_value "$1" $#
                [ -z "$token_source" ] || usage_error "give --token or --token-file, not both"
                token=$2; token_source=--token; shift 2 ;;
            --token-file)
                need_value "$1" $#
                [ -z "$token_source" ] || usage_error "give --token or --token-file, not both"
                [ -r "$2" ] || fail "cannot read the token file $2"
                token=$(< "$2"); token_source=$2; shift 2 ;;
            --comfyui) need_value "$1" $#; comfyui+=("$2"); shift 2 ;;
            --comfyui-gpu) need_value "$1" $#; gpus+=("$2"); shift 2 ;;
            --comfyui-cmd) need_value "$1" $#; cmds+=("$2"); shift 2 ;;
            --user) need_value "$1" $#; user=$2; shift 2 ;;
            --venv) need_value "$1" $#; venv=$2; shift 2 ;;
            --shutdown-grace) need_value "$1" $#; grace=$2; shift 2 ;;
            --log-json) log_json=true; shift ;;
            --root) need_value "$1" $#; shift 2 ;;  # taken earlier
            -h | --help) usage; exit 0 ;;
            *) usage_error "unknown option for install: $1" ;;
        esac
    done

    [ -n "$server" ] || usage_error "missing --server URL (the control plane, e.g. https://fleet.example.com)"
    case $server in
        http://?* | https://?* | ws://?* | wss://?*) ;;
        *) usage_error "--server $server is not an http(s) or ws(s) URL" ;;
    esac
    [ -n "$token_source" ] || usage_error "missing --token-file FILE (or --token TOKEN): the runner's token"
    # Surrounding whitespace (the newline an editor adds) is not part of a token.
    token=$(printf '%s' "$token" | tr -d '[:space:]')
    [ -n "$token" ] || fail "the runner token from $token_source is empty"
    [ ${#comfyui[@]} -gt 0 ] || usage_error "missing --comfyui URL (the local ComfyUI, e.g. http://127.0.0.1:8188)"
    local url gpu
    for url in "${comfyui[@]}"; do
        case $url in
            http://?* | https://?*) ;;
            *) usage_error "--comfyui $url is not an http(s) URL" ;;
        esac
    done
    if [ ${#gpus[@]} -gt 0 ] && [ ${#gpus[@]} -ne ${#comfyui[@]} ]; then
        usage_error "${#gpus[@]} --comfyui-gpu for ${#comfyui[@]} --comfyui: give one per instance, or none"
    fi
    for gpu in "${gpus[@]}"; do
        [[ $gpu =~ ^[0-9]+$ ]] || usage_error "--comfyui-gpu $gpu is not a GPU index (0, 1, ...)"
    done
    if [ ${#cmds[@]} -gt 0 ] && [ ${#cmds[@]} -ne ${#comfyui[@]} ]; then
        usage_error "${#cmds[@]} --comfyui-cmd for ${#comfyui[@]} --comfyui: give one per instance, or none"
    fi
    [[ $grace =~ ^[0-9]+$ ]] || usage_error "--shutdown-grace $grace is not a whole number of seconds"
    check_plain "$server" "$token" "$user" "${comfyui[@]}" "${cmds[@]}"
    if [ -n "$user" ] && ! id -u "$user" > /dev/null 2>&1; then
        fail "no such user: $user (create it first, e.g. useradd --system --create-home $user)"
    fi

    if [ -z "$venv" ]; then
        # The virtual environment this script's checkout runs from.
        venv=${VIRTUAL_ENV:-$(dirname "$0")/../.venv}
    fi
    [ -d "$venv" ] || fail "no virtual environment at $venv: pass --venv PATH"
    venv=$(cd "$venv" && pwd -P)
    [ -x "$venv/bin/comfyfleet-agent" ] \
        || fail "no comfyfleet-agent in $venv/bin: install comfyfleet there, or pass --venv PATH"
    # systemd would need quoting and %-escaping for these; a plain path needs neither.
    [[ $venv =~ ^[A-Za-z0-9/._+-]+$ ]] \
        || fail "the venv path $venv holds characters systemd would misread: use a plain path"

    require_root_user install

    mkdir -p "$ROOT$CONF_DIR" "$ROOT$(dirname "$UNIT_FILE")"
    chmod 0755 "$ROOT$CONF_DIR"

    printf '%s\n' "$token" | write_file "$ROOT$TOKEN_FILE" 0600

    {
        echo "# The comfyfleet runner agent's settings, written by install-agent.sh."
        echo "# Edit, then: systemctl restart $UNIT_NAME"
        echo "server_url = $(toml_string "$server")"
        echo "token_file = $(toml_string "$TOKEN_FILE")"
        echo "comfyui_urls = $(toml_string_array "${comfyui[@]}")"
        if [ ${#gpus[@]} -gt 0 ]; then
            echo "comfyui_gpus = [$(IFS=, && echo "${gpus[*]}")]"
        fi
        if [ ${#cmds[@]} -gt 0 ]; then
            echo "comfyui_cmds = $(toml_string_array "${cmds[@]}")"
        fi
        echo "data_dir = $(toml_string "$STATE_DIR")"
        echo "shutdown_grace_s = $grace"
        echo "log_json = $log_json"
    } | write_file "$ROOT$CONFIG" 0640

    # SIGTERM drains: jobs get the shutdown grace, then a supervised ComfyUI its own grace;
    # systemd must wait for both (and some slack) before it sends SIGKILL.
    local stop_timeout=$((grace + COMFYUI_STOP_GRACE_S + 15))
    {
        echo "[Unit]"
        echo "Description=comfyfleet runner agent: runs ComfyUI jobs from a comfyfleet control plane"
        echo "Wants=network-online.target"
        echo "After=network-online.target"
        echo
        echo "[Service]"
        echo "Type=simple"
        if [ -n "$user" ]; then
            echo "User=$user"
        fi
        echo "ExecStart=$venv/bin/comfyfleet-agent --config $CONFIG"
        echo "StateDirectory=$(basename "$STATE_DIR")"
        echo "Environment=PYTHONUNBUFFERED=1"
        echo "Restart=on-failure"
        echo "RestartSec=5"
        echo "# 2: bad settings, 3: the control plane refused the runner for good. A restart fixes neither."
        echo "RestartPreventExitStatus=2 3"
        echo "KillSignal=SIGTERM"
        echo "# SIGTERM to the agent only: it stops its ComfyUI itself once the jobs are done."
        echo "KillMode=mixed"
        echo "TimeoutStopSec=$stop_timeout"
        echo
        echo "[Install]"
        echo "WantedBy=multi-user.target"
    } | write_file "$ROOT$UNIT_FILE" 0644

    if [ -z "$ROOT" ] && [ -n "$user" ]; then
        # The service user reads both; nobody else reads the token.
        chown "$user" "$TOKEN_FILE"
        chown "root:$(id -gn "$user")" "$CONFIG"
    fi

    echo "wrote $ROOT$CONFIG, $ROOT$TOKEN_FILE and $ROOT$UNIT_FILE"
    if have_systemd; then
        local was_active=false
        systemctl is-active --quiet "$UNIT_NAME" && was_active=true
        systemctl daemon-reload
        systemctl enable --now "$UNIT_NAME"
        if $was_active; then
            systemctl restart "$UNIT_NAME"
        fi
        echo "started $UNIT_NAME; follow it with: journalctl -u $UNIT_NAME -f"
    elif [ -z "$ROOT" ]; then
        echo "no systemctl here: start the agent with $venv/bin/comfyfleet-agent --config $CONFIG"
    fi
}

cmd_uninstall() {
    while [ $# -gt 0 ]; do
        case $1 in
            --root) need_value "$1" $#; shift 2 ;;  # taken earlier
            -h | --help) usage; exit 0 ;;
            *) usage_error "unknown option for uninstall: $1" ;;
        esac
    done
    require_root_user uninstall
    if have_systemd && [ -e "$UNIT_FILE" ]; then
        systemctl disable --now "$UNIT_NAME"
    fi
    local path removed=0
    for path in "$ROOT$UNIT_FILE" "$ROOT$CONFIG" "$ROOT$TOKEN_FILE"; do
        if [ -e "$path" ]; then
            rm -f "$path"
            echo "removed $path"
            removed=$((removed + 1))
        fi
    done
    # Job inputs and outputs in flight may be in the work folder: nothing of them stays.
    if [ -d "$ROOT$STATE_DIR" ]; then
        rm -rf "$ROOT$STATE_DIR"
        echo "removed $ROOT$STATE_DIR"
    fi
    rmdir "$ROOT$CONF_DIR" 2> /dev/null || true
    if have_systemd; then
        systemctl daemon-reload
    fi
    [ "$removed" -gt 0 ] || echo "the agent was not installed: nothing to remove"
}

ROOT=""
# --root applies to both subcommands: find it first.
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [ "${args[i]}" = "--root" ]; then
        [ $((i + 1)) -lt ${#args[@]} ] || usage_error "--root needs a value"
        ROOT=${args[i + 1]}
        [ -n "$ROOT" ] || usage_error "--root needs a value"
        mkdir -p "$ROOT"
        ROOT=$(cd "$ROOT" && pwd -P)
        # Under / itself the files land where a real install puts them: that is no --root.
        [ "$ROOT" != "/" ] || usage_error "--root / is a real install: leave --root out"
    fi
done

case ${1:-} in
    install) shift; cmd_install "$@" ;;
    uninstall) shift; cmd_uninstall "$@" ;;
    -h | --help) usage ;;
    "") usage_error "missing subcommand: install or uninstall" ;;
    *) usage_error "unknown subcommand: $1 (install or uninstall)" ;;
esac
