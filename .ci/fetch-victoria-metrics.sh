#!/usr/bin/env bash
# Puts a VictoriaMetrics single-node binary at <checkout>/.cache/bin/victoria-metrics for the
# end-to-end tests (they also honour HOSTAGENT_VM_BIN). The binary comes from the distro's
# victoria-metrics package, downloaded and unpacked but never installed (no service, no
# dependencies). The tests send OTLP to /opentelemetry/v1/metrics, which needs VictoriaMetrics
# >= 1.92: bookworm's package is older, so on Debian 12 `./install.sh --dev` first adds a trixie
# source pinned low; the highest version any apt source offers is taken. Idempotent.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=$ROOT/.cache/bin
DEST=$BIN_DIR/victoria-metrics
DEB_DIR=$ROOT/.cache/deb
PKG=victoria-metrics
OTLP_PATH=/opentelemetry/v1/metrics

say()  { echo "fetch-victoria-metrics: $*"; }
fail() { echo "fetch-victoria-metrics: $1: $2" >&2; exit 1; }

supports_otlp() { grep -aqF "$OTLP_PATH" "$1"; }
runs() { "$1" -version >/dev/null 2>&1; }
# Debian builds leave the binary's own version string empty, so the package version is kept beside it.
version_of() { cat "$1.version" 2>/dev/null || "$1" -version 2>/dev/null | head -n 1; }

if [[ -n ${HOSTAGENT_VM_BIN:-} ]]; then
    [[ -x $HOSTAGENT_VM_BIN ]] || fail "HOSTAGENT_VM_BIN=$HOSTAGENT_VM_BIN is not an executable" "unset it to fetch the binary into $DEST"
    say "using HOSTAGENT_VM_BIN=$HOSTAGENT_VM_BIN"
    exit 0
fi

if [[ -x $DEST ]] && supports_otlp "$DEST" && runs "$DEST"; then
    say "present: $DEST ($(version_of "$DEST"))"
    exit 0
fi

command -v apt-get >/dev/null || fail "apt-get not found" "set HOSTAGENT_VM_BIN to a victoria-metrics binary (>= 1.92) instead"

# Highest version of the package over all apt sources (apt-cache madison lists every source).
version=""
while read -r v; do
    [[ -n $v ]] || continue
    if [[ -z $version ]] || dpkg --compare-versions "$v" gt "$version"; then version=$v; fi
done < <(apt-cache madison "$PKG" 2>/dev/null | awk -F'|' '{gsub(/[ \t]/, "", $2); print $2}')
[[ -n $version ]] || fail "no $PKG package in the apt sources" \
    "on Debian 12 run ./install.sh --dev (it adds trixie pinned low), then apt-get update; or set HOSTAGENT_VM_BIN"

mkdir -p "$DEB_DIR" "$BIN_DIR"
debglob="${PKG}_${version//:/%3a}_*.deb"   # apt-get download writes an epoch's ':' as %3a
deb=$(find "$DEB_DIR" -maxdepth 1 -name "$debglob" | head -n 1)
if [[ -z $deb ]]; then
    say "apt-get download $PKG=$version"
    # apt's download sandbox user (_apt) may not be able to write into the checkout.
    (cd "$DEB_DIR" && apt-get -q -o APT::Sandbox::User=root download "$PKG=$version") \
        || fail "apt-get download $PKG=$version failed" "run apt-get update and check the apt sources"
    deb=$(find "$DEB_DIR" -maxdepth 1 -name "$debglob" | head -n 1)
    [[ -n $deb ]] || fail "apt-get download left no ${PKG}_*.deb in $DEB_DIR" "run it by hand in $DEB_DIR to see why"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp/root" || fail "cannot unpack $deb" "delete it and run this script again"
src=$tmp/root/usr/bin/victoria-metrics
if [[ ! -f $src ]]; then
    src=$(find "$tmp/root" -type f -name 'victoria-metrics*' -perm -u+x | head -n 1)
fi
[[ -n $src && -f $src ]] || fail "no victoria-metrics binary inside $deb" "list it with: dpkg-deb -c $deb"
supports_otlp "$src" || fail "$PKG $version has no OTLP ingestion ($OTLP_PATH)" \
    "VictoriaMetrics >= 1.92 is needed; on Debian 12 ./install.sh --dev adds trixie for it, or set HOSTAGENT_VM_BIN"

runs "$src" || fail "the victoria-metrics binary from $deb does not run here" "try it by hand: $src -version"
install -m 0755 "$src" "$DEST.tmp" && mv -f "$DEST.tmp" "$DEST"
echo "$PKG $version" >"$DEST.version"
say "installed $DEST ($PKG $version)"
