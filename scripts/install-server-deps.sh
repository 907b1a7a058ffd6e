#!/usr/bin/env bash
# Install the server side of omop_emb on Debian/Ubuntu:
#   PostgreSQL (the major already installed, else the distribution default),
#   postgresql-plpython3-N, postgresql-server-dev-N, python3-requests, dpkg-dev,
#   and pgvector >= 0.8 (binary package when apt has one, else built from
#   Debian's own source package of the next release, against pg_config);
#   chromium, the headless browser the review page's end-to-end tests drive
#   (OMOP_EMB_NO_BROWSER=1 skips it on a server that will never run the tests).
#
# Idempotent: a second run checks what is there and exits in well under a second.
# Run as root or through sudo.
#
# Environment:
#   PG_MAJOR            force a PostgreSQL major (default: detected)
#   PGVECTOR_MIN        minimum pgvector version (default 0.8.0)
#   PGVECTOR_SRC_SUITE  Debian suite whose source index holds pgvector (default trixie)
#   OMOP_EMB_VERBOSE=1  show apt/make output
#   OMOP_EMB_NO_BROWSER=1  do not install chromium

set -euo pipefail

PGVECTOR_MIN="${PGVECTOR_MIN:-0.8.0}"
PGVECTOR_SRC_SUITE="${PGVECTOR_SRC_SUITE:-trixie}"
VERBOSE="${OMOP_EMB_VERBOSE:-0}"
SRC_LIST="/etc/apt/sources.list.d/omop-emb-${PGVECTOR_SRC_SUITE}-src.sources"

log()  { echo "install-server-deps: $*" >&2; }
die()  { echo "install-server-deps: ERROR: $*" >&2; exit 1; }

# Run a command quietly; on failure show its output and stop with a message.
quiet() {
    local what="$1"; shift
    if [ "$VERBOSE" = 1 ]; then
        "$@" || die "$what failed: $*"
        return
    fi
    local out
    out="$(mktemp)"
    if ! "$@" >"$out" 2>&1; then
        tail -n 40 "$out" >&2
        rm -f "$out"
        die "$what failed: $*"
    fi
    rm -f "$out"
}

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -E bash "$0" "$@"
    fi
    die "must run as root (or have sudo)"
fi

command -v apt-get >/dev/null 2>&1 || die "this script supports Debian/Ubuntu (apt-get not found)"
export DEBIAN_FRONTEND=noninteractive

# ---------------------------------------------------------------- helpers
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

is_debian() { [ -r /etc/os-release ] && grep -qE '^ID=("?)debian\1$' /etc/os-release; }

# version_ge A B: true when A >= B (dpkg ordering).
version_ge() { dpkg --compare-versions "$1" ge "$2"; }

APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        quiet "apt-get update" apt-get update -q
        APT_UPDATED=1
    fi
}

apt_install() {
    apt_update
    log "installing: $*"
    quiet "apt-get install $*" apt-get install -y -q --no-install-recommends "$@"
}

# ---------------------------------------------------------------- PG major
detect_pg_major() {
    if [ -n "${PG_MAJOR:-}" ]; then echo "$PG_MAJOR"; return; fi
    if command -v pg_config >/dev/null 2>&1; then
        local v
        v="$(pg_config --version 2>/dev/null | sed -n 's/^PostgreSQL \([0-9][0-9]*\).*/\1/p')"
        if [ -n "$v" ]; then echo "$v"; return; fi
    fi
    local newest
    newest="$(ls -1 /usr/lib/postgresql 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -n 1 || true)"
    if [ -n "$newest" ]; then echo "$newest"; return; fi
    echo ""
}

PG_MAJOR="$(detect_pg_major)"
if [ -z "$PG_MAJOR" ]; then
    # Nothing installed: take the distribution default (the `postgresql` metapackage).
    apt_install postgresql postgresql-common
    PG_MAJOR="$(ls -1 /usr/lib/postgresql 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -n 1 || true)"
    [ -n "$PG_MAJOR" ] || die "installed 'postgresql' but found no /usr/lib/postgresql/<major>"
fi

# The versioned pg_config (never the one from another major on PATH).
PG_CONFIG="/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config"

# ---------------------------------------------------------------- Debian packages
want=(
    "postgresql-${PG_MAJOR}"
    "postgresql-plpython3-${PG_MAJOR}"
    "postgresql-server-dev-${PG_MAJOR}"
    "python3-requests"
    "dpkg-dev"
)
# Debian's chromium (Ubuntu has only a snap wrapper under that name; there, install a browser
# yourself and point OMOP_EMB_CHROMIUM at it).
if [ "${OMOP_EMB_NO_BROWSER:-0}" != 1 ] && is_debian; then
    want+=("chromium")
fi
missing=()
for p in "${want[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi
[ -x "$PG_CONFIG" ] || PG_CONFIG="$(command -v pg_config || true)"
[ -n "$PG_CONFIG" ] && [ -x "$PG_CONFIG" ] || die "pg_config for PostgreSQL ${PG_MAJOR} not found (is postgresql-server-dev-${PG_MAJOR} installed?)"

SHAREDIR="$("$PG_CONFIG" --sharedir)"
PKGLIBDIR="$("$PG_CONFIG" --pkglibdir)"
EXTDIR="${SHAREDIR}/extension"

[ -f "${EXTDIR}/plpython3u.control" ] || die "plpython3u.control missing from ${EXTDIR} after installing postgresql-plpython3-${PG_MAJOR}"

# ---------------------------------------------------------------- pgvector
pgvector_version() {
    local f="${EXTDIR}/vector.control"
    [ -f "$f" ] || { echo ""; return; }
    sed -n "s/^[[:space:]]*default_version[[:space:]]*=[[:space:]]*'\{0,1\}\([^']*\)'\{0,1\}.*/\1/p" "$f" | head -n 1
}

pgvector_ok() {
    local v
    v="$(pgvector_version)"
    [ -n "$v" ] && version_ge "$v" "$PGVECTOR_MIN" && [ -f "${PKGLIBDIR}/vector.so" ]
}

# Candidate version of a binary package, empty when apt has none.
apt_candidate() {
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^[[:space:]]*Candidate:[[:space:]]*//p' | grep -v '(none)' | head -n 1 || true
}

# The URI of the Debian archive this machine already uses (deb822 first, then one-line lists).
debian_uri() {
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri="$(awk '
            /^[[:space:]]*$/ { if (types ~ /deb/ && uris != "" && suites !~ /security/) { print uris; exit } types=""; uris=""; suites=""; next }
            /^Types:/  { types=$0 }
            /^URIs:/   { uris=$2 }
            /^Suites:/ { suites=$0 }
            END { if (types ~ /deb/ && uris != "" && suites !~ /security/) print uris }
        ' /etc/apt/sources.list.d/debian.sources | head -n 1)"
    fi
    if [ -z "$uri" ]; then
        uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1=="deb" && $0 !~ /security/ { for (i=2;i<=NF;i++) if ($i ~ /^(https?|ftp|file):/) { print $i; exit } }' \
            | head -n 1)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}


build_pgvector_from_debian_source() {
    local uri
    if is_debian; then
        uri="$(debian_uri)"
    else
        # Ubuntu and other derivatives: Debian's own archive (its keyring may need installing).
        uri="http://deb.debian.org/debian"
        [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || apt_install debian-archive-keyring
    fi
    if [ ! -f "$SRC_LIST" ]; then
        log "adding deb-src ${uri} ${PGVECTOR_SRC_SUITE} (${SRC_LIST})"
        cat >"$SRC_LIST" <<EOF
Types: deb-src
URIs: ${uri}
Suites: ${PGVECTOR_SRC_SUITE}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        APT_UPDATED=0
    fi
    apt_update

    local tmp
    tmp="$(mktemp -d /tmp/omop-emb-pgvector.XXXXXX)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    chmod 755 "$tmp"
    log "fetching Debian source package pgvector (${PGVECTOR_SRC_SUITE})"
    # apt-get source drops privileges to _apt when it can; let it write here.
    if id _apt >/dev/null 2>&1; then chown _apt "$tmp" 2>/dev/null || true; fi
    (cd "$tmp" && quiet "apt-get source pgvector" apt-get source --download-only -q pgvector)
    local dsc
    dsc="$(ls -1 "$tmp"/pgvector_*.dsc 2>/dev/null | head -n 1 || true)"
    [ -n "$dsc" ] || die "apt-get source pgvector downloaded no .dsc (is '${PGVECTOR_SRC_SUITE}' in the deb-src index?)"
    (cd "$tmp" && quiet "dpkg-source -x" dpkg-source -x "$dsc" src)

    log "building pgvector $(basename "$dsc" .dsc | sed 's/^pgvector_//') against ${PG_CONFIG}"
    # OPTFLAGS="" : no -march=native, so the build runs on any x86-64/arm64 host of the same arch.
    quiet "make pgvector" make -C "$tmp/src" PG_CONFIG="$PG_CONFIG" OPTFLAGS="" -j"$(nproc 2>/dev/null || echo 2)"
    quiet "make install pgvector" make -C "$tmp/src" install PG_CONFIG="$PG_CONFIG"
    rm -rf "$tmp"
    trap - EXIT
}

if pgvector_ok; then
    :
else
    have="$(pgvector_version)"
    [ -n "$have" ] && log "pgvector ${have} is older than ${PGVECTOR_MIN}; upgrading"
    apt_update
    cand="$(apt_candidate "postgresql-${PG_MAJOR}-pgvector")"
    if [ -n "$cand" ] && version_ge "$cand" "$PGVECTOR_MIN"; then
        apt_install "postgresql-${PG_MAJOR}-pgvector"
    else
        [ -n "$cand" ] && log "apt offers postgresql-${PG_MAJOR}-pgvector ${cand} (< ${PGVECTOR_MIN}); building from source instead"
        build_pgvector_from_debian_source
    fi
    pgvector_ok || die "pgvector >= ${PGVECTOR_MIN} still not found in ${EXTDIR} (found: '$(pgvector_version)')"
fi

log "ok: PostgreSQL ${PG_MAJOR} ($("$PG_CONFIG" --version)), plpython3u, pgvector $(pgvector_version), python3-requests$(command -v chromium >/dev/null 2>&1 && echo ', chromium')"
