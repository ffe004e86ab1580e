#!/usr/bin/env bash
# Remove what deploy/install.sh installed.
#
#   sudo deploy/uninstall.sh [--purge] [--no-systemctl]
#   DESTDIR=/tmp/root deploy/uninstall.sh
#
# Removes the unit, /usr/bin/batchd, the venv in /opt/batchd and the sysusers
# and tmpfiles entries. The configuration (/etc/batchd) and the spool with
# every input, result and the database (/var/lib/batchd) stay unless --purge.
# The batchd user and batchd-drop group always stay: files on disk may still
# carry their ids, and reusing a removed system id would hand them to someone
# else.
set -euo pipefail

PREFIX=/opt/batchd
SPOOL_ROOT=/var/lib/batchd
UNIT_DIR=/usr/lib/systemd/system
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}

purge=no
run_systemctl=yes

say() { printf '%s\n' "$*"; }
die() {
    printf 'uninstall.sh: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<EOF
usage: $0 [--purge] [--no-systemctl]

  --purge          also delete /etc/batchd and the spool $SPOOL_ROOT
                   (every input, result and the database)
  --no-systemctl   do not stop the service or run 'systemctl daemon-reload'
  DESTDIR=PATH     remove below PATH instead of /; implies --no-systemctl
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
    --purge)
        purge=yes
        shift
        ;;
    --no-systemctl)
        run_systemctl=no
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
done

use_systemctl=no
if [ -z "$DESTDIR" ]; then
    [ "$(id -u)" = 0 ] || die "run as root (or set DESTDIR for a fake root)"
    if [ "$run_systemctl" = yes ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        use_systemctl=yes
    fi
fi

if [ "$use_systemctl" = yes ]; then
    # Stopping lets running files finish (the unit's grace), then requeues the rest.
    systemctl disable --now batchd.service 2>/dev/null || true
fi

rm -f "$DESTDIR$UNIT_DIR/batchd.service"
rm -f "$DESTDIR/usr/lib/sysusers.d/batchd.conf" "$DESTDIR/usr/lib/tmpfiles.d/batchd.conf"
# Only our link: a batchd installed some other way is not ours to remove.
if [ -L "$DESTDIR/usr/bin/batchd" ] && [ "$(readlink "$DESTDIR/usr/bin/batchd")" = "$PREFIX/bin/batchd" ]; then
    rm -f "$DESTDIR/usr/bin/batchd"
fi
rm -rf "$DESTDIR$PREFIX"

if [ "$use_systemctl" = yes ]; then
    systemctl daemon-reload
    systemctl reset-failed batchd.service 2>/dev/null || true
fi

if [ "$purge" = yes ]; then
    rm -rf "$DESTDIR/etc/batchd" "$DESTDIR$SPOOL_ROOT"
    say "batchd removed, with its configuration and spool."
else
    say "batchd removed. Kept /etc/batchd and $SPOOL_ROOT (inputs, results, database);"
    say "'$0 --purge' deletes them."
fi
say "The batchd user and batchd-drop group were kept (see the top of this script)."
