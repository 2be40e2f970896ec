#!/usr/bin/env bash
# Prints the path of a Debian 12 root that boots systemd under systemd-nspawn, for
# tests/test_systemd_container.py: debootstrap minbase with systemd and what the hostagent .deb
# depends on (and nothing it only suggests), so the package installs with apt inside and without
# network.
#
# Built once (about 3 minutes) and cached under /var/cache/hostagent-test/, keyed by a hash of the
# suite and the package list: a change to either builds a new root and removes the old one. The
# cached root is never booted writable: the test boots it with --volatile=overlay.
#
# The Debian mirror is the one the machine's own apt sources use (found the way install.sh finds
# the source it copies for trixie); HOSTAGENT_DEBIAN_MIRROR overrides it.
# Needs root, debootstrap and flock (install.sh --dev installs them).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${HOSTAGENT_TEST_CACHE:-/var/cache/hostagent-test}
SUITE=bookworm
# systemd as PID 1, then packaging/build.py's Depends (libbpf1 for the CO-RE loader; procps for
# the unit's /bin/kill): the test installs the .deb offline, so a new dependency must be added here
# too. No python3-bpfcc, clang, LLVM or kernel headers: the test shows the probes run without them.
PACKAGES=systemd,systemd-sysv,dbus,python3,libbpf1,procps

say()  { echo "systemd-root: $*" >&2; }
fail() { echo "systemd-root: $1: $2" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || fail "must run as root" "debootstrap needs it"
command -v debootstrap >/dev/null || fail "debootstrap not found" "run ./install.sh --dev (Debian package debootstrap)"

key=$(printf '%s %s minbase\n' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-16)
root=$CACHE/$SUITE-$key

mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock 9   # one build at a time; a second caller waits and then finds the root built

if [[ -f $root/.hostagent-root ]]; then
    say "cached: $root"
    echo "$root"
    exit 0
fi

# URIs of the first enabled apt source of suite $1 (install.sh's reader of deb822 and one-line sources)
source_uri() {
    # shellcheck source=../install.sh
    (. "$REPO/install.sh" && main_source_stanza "$1") | awk '$1 == "URIs:" {print $2; exit}'
}

mirror=${HOSTAGENT_DEBIAN_MIRROR:-}
if [[ -z $mirror ]]; then
    mirror=$(source_uri "$SUITE")
    if [[ -z $mirror ]]; then  # a Debian host of another release: its mirror serves bookworm too
        host_id=$(. /etc/os-release && echo "${ID:-}") host_codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
        [[ $host_id == debian && -n $host_codename ]] && mirror=$(source_uri "$host_codename")
    fi
fi
[[ -n $mirror ]] || fail "no Debian mirror in this machine's apt sources" "set HOSTAGENT_DEBIAN_MIRROR to one"

keyring=()
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] && keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)

for old in "$CACHE/$SUITE"-*; do
    [[ -e $old && $old != "$root.tmp" ]] || continue
    # a container booted from it (another checkout's test run) has it mounted: leave it for now
    if grep -qF "$old" /proc/mounts; then
        say "keeping $old (another package list, in use)"
        continue
    fi
    say "removing $old (another package list)"
    rm -rf --one-file-system "$old"
done
tmp=$root.tmp
rm -rf --one-file-system "$tmp"
trap 'rm -rf --one-file-system "$tmp"' EXIT
start=$SECONDS
say "debootstrap $SUITE ($PACKAGES) from $mirror into $root"
if ! debootstrap --variant=minbase --include="$PACKAGES" "${keyring[@]}" "$SUITE" "$tmp" "$mirror" >"$CACHE/debootstrap.log" 2>&1; then
    tail -n 20 "$CACHE/debootstrap.log" >&2
    fail "debootstrap failed (log: $CACHE/debootstrap.log)" "check the mirror $mirror and network access to it"
fi
# Smaller and the same on every boot: no downloaded packages, no machine id (systemd makes one).
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*_Packages
: >"$tmp/etc/machine-id"
echo hostagent-test >"$tmp/etc/hostname"
echo "$SUITE $PACKAGES" >"$tmp/.hostagent-root"
mv "$tmp" "$root"
trap - EXIT
say "built $root in $((SECONDS - start))s ($(du -sh --one-file-system "$root" | cut -f1))"
echo "$root"
