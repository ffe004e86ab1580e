#!/usr/bin/env bash
# Install batchd as a systemd service. Idempotent: run it again to upgrade.
#
#   sudo deploy/install.sh [--source DIR] [--wheelhouse DIR] [--with-ocr]
#                          [--no-systemctl] [--skip-venv]
#   DESTDIR=/tmp/root deploy/install.sh     # stage into a fake root (packaging, tests)
#
# What goes where (all below $DESTDIR):
#   /opt/batchd/                           a venv with batchd[systemd]
#   /usr/bin/batchd                        -> /opt/batchd/bin/batchd
#   /etc/batchd/config.toml                from config.example.toml, only if absent
#   /etc/batchd/http-token.env             a random HTTP token, first install only
#                                          (real root only; 0640 root:batchd)
#   /usr/lib/sysusers.d/batchd.conf        user batchd, group batchd-drop
#   /usr/lib/tmpfiles.d/batchd.conf        the spool folders under /var/lib/batchd
#   /usr/lib/systemd/system/batchd.service the unit
#
# On the real root (no DESTDIR) it also creates the user, group and spool
# (systemd-sysusers, systemd-tmpfiles) and runs `systemctl daemon-reload`
# when systemd is running. It never enables or starts the service.
#
# Environment: DESTDIR (fake root), PYTHON (interpreter for the venv,
# default python3, must be >= 3.11), BATCHD_INSTALL_SKIP_VENV=1 (= --skip-venv).
set -euo pipefail

PREFIX=/opt/batchd
SPOOL_ROOT=/var/lib/batchd
UNIT_DIR=/usr/lib/systemd/system
PYTHON=${PYTHON:-python3}
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}

source_dir=$(cd "$(dirname "$0")/.." && pwd)
run_systemctl=yes
skip_venv=no
wheelhouse=
with_ocr=no
[ "${BATCHD_INSTALL_SKIP_VENV:-}" = 1 ] && skip_venv=yes

say() { printf '%s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<EOF
usage: $0 [--source DIR] [--wheelhouse DIR] [--with-ocr] [--no-systemctl] [--skip-venv]

  --source DIR     the batchd source tree to install (default: $source_dir)
  --wheelhouse DIR install batchd and its dependencies from the wheels and
                   sdists in DIR only (pip --no-index --find-links DIR): for
                   hosts and containers without the package index. A batchd
                   wheel in DIR is used; else the source tree is built there.
  --with-ocr       also apt-get install tesseract-ocr tesseract-ocr-eng (OCR
                   of scanned PDFs)
  --no-systemctl   do not run 'systemctl daemon-reload'
  --skip-venv      do not create or update the venv in $PREFIX
  DESTDIR=PATH     install below PATH instead of /; implies --no-systemctl and
                   creates no users, groups or spool folders
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
    --source)
        [ $# -ge 2 ] || die "--source needs a folder"
        source_dir=$(cd "$2" && pwd) || die "no such folder: $2"
        shift 2
        ;;
    --source=*)
        source_dir=$(cd "${1#--source=}" && pwd) || die "no such folder: ${1#--source=}"
        shift
        ;;
    --wheelhouse)
        [ $# -ge 2 ] || die "--wheelhouse needs a folder"
        wheelhouse=$(cd "$2" && pwd) || die "no such folder: $2"
        shift 2
        ;;
    --wheelhouse=*)
        wheelhouse=$(cd "${1#--wheelhouse=}" && pwd) || die "no such folder: ${1#--wheelhouse=}"
        shift
        ;;
    --with-ocr)
        with_ocr=yes
        shift
        ;;
    --no-systemctl)
        run_systemctl=no
        shift
        ;;
    --skip-venv)
        skip_venv=yes
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

for f in pyproject.toml config.example.toml deploy/batchd.service deploy/batchd.sysusers \
    deploy/batchd.tmpfiles; do
    [ -f "$source_dir/$f" ] || die "$source_dir is not a batchd source tree: $f is missing"
done

real_root=no
if [ -z "$DESTDIR" ]; then
    [ "$(id -u)" = 0 ] || die "run as root (or set DESTDIR to stage into a fake root)"
    real_root=yes
fi

# 1. The venv. First, because it is the step most likely to fail (no network,
# no compiler), and nothing else should be half-installed when it does.
venv=$DESTDIR$PREFIX
if [ "$skip_venv" = yes ]; then
    say "skipping the venv in $venv (--skip-venv)"
else
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is older than Python 3.11; set PYTHON=/path/to/python3.11+"
    if [ ! -x "$venv/bin/python" ]; then
        say "creating the venv in $venv"
        "$PYTHON" -m venv "$venv"
    fi
    say "installing batchd from $source_dir into $venv"
    # pip builds in the tree it is given (build/, *.egg-info): give it a copy,
    # so installing never writes into the source checkout.
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    for item in pyproject.toml setup.py setup.cfg MANIFEST.in README.md LICENSE LICENSE.txt \
        batchd; do
        if [ -e "$source_dir/$item" ]; then cp -R "$source_dir/$item" "$stage/"; fi
    done
    pip=("$venv/bin/python" -m pip install --quiet --upgrade)
    target=$stage
    if [ -n "$wheelhouse" ]; then
        # Local files only: never reach out to an index.
        pip+=(--no-index --find-links "$wheelhouse")
        # A newer pip only if the wheelhouse has one.
        "${pip[@]}" pip 2>/dev/null || true
        if compgen -G "$wheelhouse/batchd-*.whl" >/dev/null; then
            target=batchd
        fi
    else
        "${pip[@]}" pip
    fi
    # The systemd extra (systemd-python) is compiled against libsystemd; without
    # libsystemd-dev, pkg-config and a C compiler it does not build. batchd then
    # runs the same, minus structured journald fields.
    if ! "${pip[@]}" "${target}[systemd]"; then
        warn "the systemd extra did not build (needs libsystemd-dev, pkg-config, gcc," \
            "python3-dev${wheelhouse:+, or its sdist in $wheelhouse});" \
            "installing without it: logs reach the journal as plain text"
        "${pip[@]}" "$target" ||
            die "pip could not install batchd${wheelhouse:+ from $wheelhouse (is every dependency there?)}"
    fi
fi

# 1b. OCR, when asked for: the engine and its English data.
if [ "$with_ocr" = yes ]; then
    if [ "$real_root" = yes ]; then
        say "installing tesseract-ocr tesseract-ocr-eng (--with-ocr)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q tesseract-ocr tesseract-ocr-eng ||
            die "apt-get could not install tesseract-ocr tesseract-ocr-eng (try: apt-get update)"
    else
        warn "--with-ocr: not installing packages below DESTDIR; install tesseract-ocr" \
            "tesseract-ocr-eng on the target host"
    fi
fi

# 2. The command. An absolute target: the link is right once DESTDIR is gone.
install -d -m 0755 "$DESTDIR/usr/bin"
ln -sfn "$PREFIX/bin/batchd" "$DESTDIR/usr/bin/batchd"

# 3. systemd files.
install -D -m 0644 "$source_dir/deploy/batchd.sysusers" "$DESTDIR/usr/lib/sysusers.d/batchd.conf"
install -D -m 0644 "$source_dir/deploy/batchd.tmpfiles" "$DESTDIR/usr/lib/tmpfiles.d/batchd.conf"
install -D -m 0644 "$source_dir/deploy/batchd.service" "$DESTDIR$UNIT_DIR/batchd.service"

# 4. User, group and spool, before the config (which is group batchd).
if [ "$real_root" = yes ]; then
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers /usr/lib/sysusers.d/batchd.conf
    else
        # No systemd-sysusers (a container, a non-systemd distro): same result.
        getent group batchd-drop >/dev/null || groupadd --system batchd-drop
        getent passwd batchd >/dev/null ||
            useradd --system --user-group --home-dir "$SPOOL_ROOT" --no-create-home \
                --shell /usr/sbin/nologin --comment "batchd watch-folder daemon" batchd
        usermod -a -G batchd-drop batchd
    fi
    if command -v systemd-tmpfiles >/dev/null; then
        systemd-tmpfiles --create /usr/lib/tmpfiles.d/batchd.conf
    else
        warn "systemd-tmpfiles not found; create the spool with 'batchd init'"
    fi
fi

# 5. The config: never overwrite an operator's file. It may hold http.token,
# so it is readable by root and the batchd group only.
config=$DESTDIR/etc/batchd/config.toml
install -d -m 0755 "$DESTDIR/etc/batchd"
if [ -e "$config" ]; then
    say "keeping the existing $config"
else
    say "writing $config from config.example.toml"
    tmp=$(mktemp "$DESTDIR/etc/batchd/.config.toml.XXXXXX")
    # The example may name a developer spool; a service always uses $SPOOL_ROOT.
    awk -v root="$SPOOL_ROOT" '
        /^[[:space:]]*\[/ { section = $0; gsub(/[[:space:]]/, "", section) }
        section == "[spool]" && !done && /^[[:space:]]*#?[[:space:]]*root[[:space:]]*=/ {
            print "root = \"" root "\""
            done = 1
            next
        }
        { print }
    ' "$source_dir/config.example.toml" >"$tmp"
    chmod 0640 "$tmp"
    if [ "$real_root" = yes ] && getent group batchd >/dev/null; then
        chgrp batchd "$tmp"
    fi
    mv -f "$tmp" "$config"
fi

# 5b. The HTTP token, on the first install only: a fresh install never serves
# the API without one. The unit reads it (EnvironmentFile=); only root and the
# batchd group (the service user alone, not batchd-drop) can read it.
token_file=$DESTDIR/etc/batchd/http-token.env
if [ "$real_root" != yes ]; then
    say "not generating $token_file (DESTDIR: a token must not ship in a package)"
elif [ -e "$token_file" ]; then
    say "keeping the existing $token_file"
else
    say "writing a random HTTP token into $token_file"
    tmp=$(mktemp "$DESTDIR/etc/batchd/.http-token.env.XXXXXX")
    token=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
    printf 'BATCHD_HTTP__TOKEN=%s\n' "$token" >"$tmp"
    chmod 0640 "$tmp"
    chgrp batchd "$tmp"
    mv -f "$tmp" "$token_file"
fi

# 6. Tell systemd, when there is one to tell.
if [ "$real_root" = yes ] && [ "$run_systemctl" = yes ] && command -v systemctl >/dev/null &&
    [ -d /run/systemd/system ]; then
    systemctl daemon-reload
else
    say "not running 'systemctl daemon-reload' (DESTDIR, --no-systemctl or no running systemd)"
fi

cat <<EOF

batchd is installed${DESTDIR:+ below $DESTDIR}. Next steps:
  1. Review /etc/batchd/config.toml (limits, processor). The HTTP token is in
     /etc/batchd/http-token.env (read it as root: see README, "Token").
  2. Let people drop files:   usermod -aG batchd-drop alice   (then log in again)
  3. Start it at boot:        systemctl enable --now batchd
  4. Watch it:                systemctl status batchd; journalctl -u batchd -f
  5. Drop a file:             cp report.pdf $SPOOL_ROOT/inbox/normal/
     Results appear in $SPOOL_ROOT/outbox/<name>/.
EOF
