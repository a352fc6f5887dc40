#!/usr/bin/env bash
# Installs fieldgate on Raspberry Pi OS / Debian from this checkout; idempotent (run it again to upgrade).
#
#   sudo scripts/install.sh                      install or upgrade, enable the service
#   sudo scripts/install.sh --uninstall          remove the program and the unit; keep config and buffer
#   sudo scripts/install.sh --uninstall --purge  also remove /etc/fieldgate, /var/lib/fieldgate, the user
#
# Options:
#   --prefix DIR      install under DIR instead of / (also: DESTDIR=DIR); no user, no systemctl then
#   --no-systemctl    do not call systemctl (images, containers, tests)
#   --no-venv         do not create the virtualenv nor pip install (the package is installed otherwise)
#   --python PATH     interpreter the virtualenv is made from (default: python3)
#   --wheels DIR      pip install offline from a wheel directory (no index contacted at all)
#   --extras LIST     package extras, comma-separated (default: ble; "" for none)
#   --source DIR      the fieldgate checkout to install (default: this script's repository)
#
# Layout (see docs/OPERATIONS.md): /opt/fieldgate/venv (program), /etc/fieldgate (config, profiles,
# credentials/), /var/lib/fieldgate (buffer), /etc/systemd/system/fieldgate.service.
set -euo pipefail

root="${DESTDIR:-}"
systemctl_ok=1
make_venv=1
python=python3
wheels=""
extras="ble"
action=install
purge=0
source_dir=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) root="${2:?--prefix needs a directory}"; shift ;;
        --prefix=*) root="${1#*=}" ;;
        --no-systemctl) systemctl_ok=0 ;;
        --no-venv) make_venv=0 ;;
        --python) python="${2:?--python needs a path}"; shift ;;
        --wheels) wheels="${2:?--wheels needs a directory}"; shift ;;
        --extras) extras="${2?--extras needs a list}"; shift ;;
        --source) source_dir="${2:?--source needs a directory}"; shift ;;
        --uninstall) action=uninstall ;;
        --purge) purge=1 ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
[ "$purge" = 0 ] || [ "$action" = uninstall ] || die "--purge goes with --uninstall"

root="${root%/}"
if [ -n "$root" ]; then
    # A staging root (image build, CI): users and the running systemd belong to another machine.
    mkdir -p "$root"
    root=$(cd "$root" && pwd)
    systemctl_ok=0
    system=0
else
    system=1
    [ "$(id -u)" = 0 ] || die "run as root (sudo), or use --prefix DIR to stage into a directory"
fi

opt="$root/opt/fieldgate"
etc="$root/etc/fieldgate"
state="$root/var/lib/fieldgate"
unit="$root/etc/systemd/system/fieldgate.service"
user=fieldgate

run_systemctl() {
    if [ "$systemctl_ok" = 1 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl "$@"
    elif [ "$systemctl_ok" = 1 ]; then
        say "systemd is not running here; skipped: systemctl $*"
    fi
}

# Copy $1 to $2 unless $2 exists with other content: then leave it and put ours beside it as $2.new.
install_conffile() {
    local src=$1 dst=$2 mode=$3
    if [ ! -e "$dst" ]; then
        install -m "$mode" "$src" "$dst"
    elif ! cmp -s "$src" "$dst"; then
        install -m "$mode" "$src" "$dst.new"
        say "kept your $dst; the shipped version is $dst.new"
    fi
}

do_install() {
    [ -f "$source_dir/pyproject.toml" ] || die "$source_dir is not a fieldgate checkout (no pyproject.toml)"
    local example="$source_dir/config/fieldgate.example.yaml"
    [ -f "$example" ] || die "missing $example"

    # 1. The user. A static system user rather than DynamicUser= (docs/OPERATIONS.md): BlueZ's D-Bus
    # policy admits the "bluetooth" group as the user database lists it, and the buffer keeps one owner.
    if [ "$system" = 1 ]; then
        if ! getent passwd "$user" >/dev/null; then
            useradd --system --user-group --home-dir /var/lib/fieldgate --no-create-home \
                --shell /usr/sbin/nologin --comment "fieldgate edge-gateway agent" "$user"
            say "created system user $user"
        fi
        for group in dialout bluetooth; do
            if getent group "$group" >/dev/null && ! id -nG "$user" | tr ' ' '\n' | grep -qx "$group"; then
                usermod -a -G "$group" "$user"
                say "added $user to group $group"
            fi
        done
    fi

    # 2. Directories. /etc/fieldgate/credentials holds secrets for LoadCredential=: root-only on disk.
    install -d -m 0755 "$opt" "$opt/share/doc" "$etc" "$etc/profiles" "$root/etc/systemd/system"
    install -d -m 0700 "$etc/credentials"
    install -d -m 0750 "$state"
    if [ "$system" = 1 ]; then
        chown "$user:$user" "$state"
    fi

    # 3. The program, in its own virtualenv.
    if [ "$make_venv" = 1 ]; then
        if [ ! -x "$opt/venv/bin/python" ]; then
            "$python" -m venv "$opt/venv"
            say "created $opt/venv"
        fi
        local spec="$source_dir"
        [ -z "$extras" ] || spec="$source_dir[$extras]"
        local pip_args=(--disable-pip-version-check --quiet --upgrade)
        [ -z "$wheels" ] || pip_args+=(--no-index --find-links "$wheels")
        "$opt/venv/bin/python" -m pip install "${pip_args[@]}" "$spec"
        say "installed $("$opt/venv/bin/fieldgate" --version 2>/dev/null || echo fieldgate)"
    fi

    # 4. Config: never overwrite the operator's file; profiles as conffiles; the unit is ours to replace.
    if [ ! -e "$etc/fieldgate.yaml" ]; then
        install -m 0640 "$example" "$etc/fieldgate.yaml"
        say "wrote $etc/fieldgate.yaml from the example: edit it, then \`fieldgate check\`"
    fi
    install -m 0644 "$example" "$etc/fieldgate.example.yaml"
    if [ "$system" = 1 ]; then
        chgrp "$user" "$etc/fieldgate.yaml"
    fi
    local profile
    for profile in "$source_dir"/drivers/modbus/profiles/*.yaml; do
        [ -e "$profile" ] || continue
        install_conffile "$profile" "$etc/profiles/$(basename "$profile")" 0644
    done
    install -m 0644 "$source_dir/systemd/fieldgate.service" "$unit"
    if [ -f "$source_dir/docs/OPERATIONS.md" ]; then
        install -m 0644 "$source_dir/docs/OPERATIONS.md" "$opt/share/doc/OPERATIONS.md"
    fi

    # 5. systemd: enable at boot; restart only if it was running (an upgrade), never a first start
    # on an unedited example config.
    run_systemctl daemon-reload
    run_systemctl enable fieldgate.service
    run_systemctl try-restart fieldgate.service
    say "done. Next: edit /etc/fieldgate/fieldgate.yaml, put secrets in /etc/fieldgate/credentials/, then"
    say "  /opt/fieldgate/venv/bin/fieldgate check && systemctl start fieldgate"
}

do_uninstall() {
    run_systemctl disable --now fieldgate.service || true
    rm -f "$unit"
    run_systemctl daemon-reload
    rm -rf "$opt"
    say "removed the program and the unit"
    if [ "$purge" = 1 ]; then
        rm -rf "$etc" "$state"
        if [ "$system" = 1 ] && getent passwd "$user" >/dev/null; then
            userdel "$user"
            getent group "$user" >/dev/null && groupdel "$user" || true
        fi
        say "purged the configuration, the buffer and the user"
    else
        say "kept $etc and $state (the buffer); --purge removes them"
    fi
}

"do_$action"
