#!/usr/bin/env bash
# install.sh: from a fresh Debian 12 / Ubuntu 22.04+ host to a working hostagent in this checkout.
#
#   ./install.sh          the BPF build tools (clang-14, llvm-14, libbpf-dev, bpftool) and the probes' CO-RE objects
#                         (bpf/build/*.bpf.o), libbpf1, tracefs, .venv with hostagent; bcc and kernel
#                         headers (linked where bcc looks) only where the kernel has no BTF
#   ./install.sh --dev    the same plus what the tests need: bcc and headers always (the probe tests run
#                         under both loaders), pytest, bpfcc-tools, nftables, rpm, a C compiler, ...
#                         and a VictoriaMetrics binary at .cache/bin/victoria-metrics
#
# Idempotent: a second run checks everything, changes nothing and takes a few seconds.
# Every failure prints "install.sh: <what failed>: <hint>" and exits non-zero.
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=$ROOT/.venv
SYS_PYTHON=/usr/bin/python3
TRIXIE_SOURCES=/etc/apt/sources.list.d/hostagent-trixie.sources
TRIXIE_PIN=/etc/apt/preferences.d/hostagent-trixie

export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

say()  { echo "install.sh: $*"; }
warn() { echo "install.sh: warning: $*" >&2; }
# die <what failed> <hint> [exit status]
die()  { echo "install.sh: $1: $2" >&2; exit "${3:-1}"; }

usage() {
    cat <<'EOF'
usage: ./install.sh [--dev]

Installs the BPF build tools (clang-14, llvm-14, libbpf-dev, bpftool), builds the probes' CO-RE objects
(bpf/build.sh -> bpf/build/*.bpf.o), installs libbpf1 and python3-venv, mounts tracefs, and installs
hostagent into <checkout>/.venv. Where the kernel has no BTF (/sys/kernel/btf/vmlinux absent), the
probes load through bcc instead: then it also installs bcc (python3-bpfcc) and kernel headers and
links the headers where bcc looks for them.

  --dev    also install bcc and kernel headers whatever the kernel (the probe tests run under both
           loaders) and the test dependencies (pytest, bpfcc-tools, nftables, iproute2, python3-seccomp,
           e2fsprogs, rpm, systemd, systemd-container, debootstrap, a C compiler, ...) and a VictoriaMetrics binary at
           .cache/bin/victoria-metrics (Debian: from trixie, added as an apt source pinned low)
EOF
}

# --- host checks ------------------------------------------------------------------------------

OS_ID="" OS_LIKE="" OS_VERSION="" OS_CODENAME="" FAMILY=""

detect_os() {
    [[ -r /etc/os-release ]] || die "cannot identify the OS" "/etc/os-release is missing; supported are Debian 12+ and Ubuntu 22.04+" 2
    local osr pretty
    # shellcheck disable=SC1091
    mapfile -t osr < <(. /etc/os-release && printf '%s\n' "${ID:-}" "${ID_LIKE:-}" "${VERSION_ID:-}" \
        "${VERSION_CODENAME:-}" "${PRETTY_NAME:-${ID:-unknown}}")
    OS_ID=${osr[0]:-} OS_LIKE=${osr[1]:-} OS_VERSION=${osr[2]:-} OS_CODENAME=${osr[3]:-} pretty=${osr[4]:-unknown}
    local words=" $OS_ID $OS_LIKE "
    if [[ $words == *" ubuntu "* ]]; then
        FAMILY=ubuntu
    elif [[ $words == *" debian "* ]]; then
        FAMILY=debian
    elif [[ $words =~ \ (rhel|fedora|centos|rocky|almalinux|ol|amzn)\  ]]; then
        die "unsupported OS: $pretty" "RHEL-family hosts are not supported yet; use Debian 12+ or Ubuntu 22.04+" 2
    else
        die "unsupported OS: $pretty" "install.sh supports Debian 12+ and Ubuntu 22.04+ (ID or ID_LIKE debian)" 2
    fi
    local major=${OS_VERSION%%.*}
    if [[ $OS_ID == debian && $major =~ ^[0-9]+$ ]] && (( major < 12 )); then
        die "unsupported OS: $pretty" "Debian 12 (bookworm) or newer is needed (Python >= 3.10)" 2
    fi
    if [[ $OS_ID == ubuntu && $major =~ ^[0-9]+$ ]] && (( major < 22 )); then
        die "unsupported OS: $pretty" "Ubuntu 22.04 or newer is needed (Python >= 3.10)" 2
    fi
    if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
        die "apt-get/dpkg not found on $pretty" "install.sh needs a Debian-style package manager" 2
    fi
    say "host: $pretty ($(uname -m), kernel $(uname -r))"
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root" "it installs packages, links kernel headers and mounts tracefs; re-run as: sudo ./install.sh${*:+ $*}" 2
}

# --- apt ----------------------------------------------------------------------------------------

APT_UPDATED=0

apt_update() {
    [[ $APT_UPDATED == 1 ]] && return 0
    say "apt-get update"
    apt-get -q update || die "apt-get update failed" "check the apt sources in /etc/apt/sources.list.d/ and network access to them"
    APT_UPDATED=1
}

installed() {
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == ii* ]]
}

candidate() {  # prints the candidate version of a package, or nothing
    local c
    c=$(apt-cache policy "$1" 2>/dev/null | awk '/^ +Candidate:/ {print $2; exit}')
    [[ -n $c && $c != "(none)" ]] && echo "$c"
    return 0
}

apt_install() {  # installs those of the given packages that are not installed yet
    local missing=() p
    for p in "$@"; do installed "$p" || missing+=("$p"); done
    (( ${#missing[@]} )) || return 0
    apt_update
    say "apt-get install ${missing[*]}"
    apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed" "see the apt output above; 'apt-get -f install' repairs a half-done install"
}

# --- kernel headers -----------------------------------------------------------------------------

headers_flavour() {  # the suffix of the distro's generic header directories: amd64, arm64, generic ...
    if [[ $FAMILY == ubuntu ]]; then echo generic; return; fi
    case $(dpkg --print-architecture) in
        i386)    echo 686-pae ;;
        armhf)   echo armmp ;;
        ppc64el) echo powerpc64le ;;
        *)       dpkg --print-architecture ;;
    esac
}

# The highest configured header tree under /usr/src (one with generated headers, i.e. the
# arch-specific directory, not the -common one), preferring the distro's generic flavour.
highest_headers_dir() {
    local flavour=$1 d all=() preferred=()
    for d in /usr/src/linux-headers-*; do
        [[ -d $d && -f $d/Makefile && ( -f $d/include/generated/autoconf.h || -f $d/.config ) ]] || continue
        all+=("$d")
        [[ $d == *-"$flavour" ]] && preferred+=("$d")
    done
    (( ${#preferred[@]} )) && all=("${preferred[@]}")
    (( ${#all[@]} )) || return 0
    printf '%s\n' "${all[@]}" | sort -V | tail -n 1
}

# The `source` tree that belongs to a build tree: the distro's header packages ship
# /lib/modules/<ver>/{build,source}; reuse their pairing. Without one, the build tree itself.
source_dir_for() {
    local build=$1 m
    for m in /lib/modules/*/build; do
        [[ -L $m && $(readlink -f "$m") == "$build" ]] || continue
        if [[ -d ${m%/build}/source ]]; then readlink -f "${m%/build}/source"; return; fi
    done
    echo "$build"
}

# link_one <link> <target>: create or refresh a symlink we own; never replace a real directory
# or a working link that points outside /usr/src/linux-headers-*.
link_one() {
    local link=$1 target=$2 cur
    if [[ -L $link ]]; then
        cur=$(readlink "$link")
        [[ $cur == "$target" ]] && return 0
        if [[ -e $link && $cur != /usr/src/linux-headers-* ]]; then
            say "kernel headers: leaving $link -> $cur alone (not a link this script manages)"
            return 0
        fi
        ln -sfn "$target" "$link" || die "cannot link $link" "check that /lib/modules is writable"
        say "kernel headers: relinked $link -> $target (was $cur)"
    elif [[ -e $link ]]; then
        say "kernel headers: $link is a real directory; leaving it alone"
    else
        ln -s "$target" "$link" || die "cannot link $link" "check that /lib/modules is writable"
        say "kernel headers: linked $link -> $target"
    fi
}

setup_headers() {
    local krel exact moddir flavour meta why ver
    krel=$(uname -r)
    exact=linux-headers-$krel
    moddir=/lib/modules/$krel

    if [[ -d $moddir/build && ! -L $moddir/build && -f $moddir/build/Makefile ]]; then
        say "kernel headers: $moddir/build is a real header tree; using it"
        return 0
    fi
    if installed "$exact"; then
        say "kernel headers: $exact is installed (exact match for the running kernel)"
        return 0
    fi

    flavour=$(headers_flavour)
    if [[ $FAMILY == ubuntu ]]; then meta=linux-headers-generic; else meta=linux-headers-$flavour; fi

    # A warm host (fallback installed and linked) needs no package look-ups at all.
    if ! { installed "$meta" && [[ -f $moddir/build/Makefile ]]; }; then
        apt_update
        if [[ -n $(candidate "$exact") ]]; then
            apt_install "$exact"
            say "kernel headers: installed $exact (exact match for the running kernel)"
            return 0
        fi
        [[ -n $(candidate "$meta") ]] \
            || die "no kernel headers package available" "neither $exact nor $meta is in the apt sources; install headers for kernel $krel by hand (eBPF probes stay off without them)"
        apt_install "$meta"
    fi

    local build source
    build=$(highest_headers_dir "$flavour")
    [[ -n $build ]] || die "no header tree under /usr/src after installing $meta" "check 'dpkg -L $meta' and its dependencies"
    source=$(source_dir_for "$build")
    ver=$(dpkg-query -W -f='${Version}' "$meta" 2>/dev/null || true)
    why="no $exact package exists in the apt sources, so the nearest available headers ($meta ${ver:-?}) stand in; the probes read tracepoint arguments only, so the version difference is harmless"

    mkdir -p "$moddir" || die "cannot create $moddir" "check that /lib/modules is writable"
    link_one "$moddir/build" "$build"
    link_one "$moddir/source" "$source"
    if [[ $(readlink -f "$moddir/build") == "$build" ]]; then
        say "kernel headers: $moddir/build -> $build: $why"
    else
        say "kernel headers: using $moddir/build -> $(readlink -f "$moddir/build") (set up outside install.sh)"
    fi
}

# --- CO-RE objects -------------------------------------------------------------------------------

BTF=/sys/kernel/btf/vmlinux

# The build tools: clang-14 (the release the programs are tested with; plain clang where the distro
# has no clang-14) and its llvm-strip, libbpf's headers, and bpftool (bpf/build.sh makes vmlinux.h
# with it). Ubuntu has no bpftool package: its bpftool is in linux-tools-<kernel>, through
# linux-tools-common's wrapper.
BUILD_TOOLS=()

build_tool_packages() {
    BUILD_TOOLS=(clang-14 llvm-14 libbpf-dev)
    installed clang-14 || [[ -n $(candidate clang-14) ]] || BUILD_TOOLS=(clang llvm libbpf-dev)
    if installed bpftool || [[ -n $(candidate bpftool) ]]; then
        BUILD_TOOLS+=(bpftool)
    elif [[ $FAMILY == ubuntu ]]; then
        BUILD_TOOLS+=(linux-tools-common "linux-tools-$(uname -r)")
    else
        die "no bpftool package in the apt sources" "bpf/build.sh needs bpftool to generate vmlinux.h; install it by hand"
    fi
}

# True when every bpf/*.bpf.c has its object in bpf/build, at least as new as the newest program,
# shared header or bpf/build.sh, and the system call table is there: a second run does not compile
# again.
objects_fresh() {
    local src newest
    [[ -s $ROOT/bpf/build/syscalls.txt ]] || return 1
    newest=$(stat -c %Y "$ROOT"/bpf/*.bpf.c "$ROOT"/bpf/include/* "$ROOT"/bpf/build.sh 2>/dev/null | sort -n | tail -n 1)
    for src in "$ROOT"/bpf/*.bpf.c; do
        src=$(basename "$src")
        [[ -f $ROOT/bpf/build/${src%.c}.o && $(stat -c %Y "$ROOT/bpf/build/${src%.c}.o") -ge $newest ]] || return 1
    done
}

build_objects() {
    [[ -f $ROOT/bpf/build.sh ]] \
        || die "bpf/build.sh is missing" "the checkout is incomplete; check out the whole repository"
    if objects_fresh; then
        say "BPF objects: bpf/build/*.bpf.o are up to date"
        return 0
    fi
    say "BPF objects: bpf/build.sh (CO-RE, for any kernel with BTF)"
    CLANG=${CLANG:-${BUILD_TOOLS[0]}} bash "$ROOT/bpf/build.sh" "$ROOT/bpf/build" \
        || die "bpf/build.sh failed" "see the compiler output above; clang-14, llvm-14, libbpf-dev and bpftool must be installed"
}

# --- tracefs ------------------------------------------------------------------------------------

setup_tracefs() {
    local t=/sys/kernel/tracing
    if mountpoint -q "$t" 2>/dev/null; then
        say "tracefs: mounted at $t"
    elif [[ -d $t ]] && mount -t tracefs tracefs "$t" 2>/dev/null; then
        say "tracefs: mounted at $t (not persistent across reboots; ./install.sh mounts it again)"
    else
        warn "tracefs could not be mounted at $t: the eBPF probes will report themselves off (mount -t tracefs tracefs $t)"
    fi
}

# --- Debian trixie, pinned low (--dev) ----------------------------------------------------------

# Prints, as deb822 fields, the Types/URIs/Components/Signed-By of the first enabled apt source
# (deb822 *.sources first, then one-line *.list) whose suites contain the release codename.
main_source_stanza() {
    local codename=$1 files=() f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f && $f != "$TRIXIE_SOURCES" ]] && files+=("$f")
    done
    if (( ${#files[@]} )); then
        awk -v want="$codename" '
            function reset() { split("", f); key = "" }
            function emit(   s, n, i, hit) {
                if (done) return
                n = split(f["suites"], s, /[ \t\n]+/)
                for (i = 1; i <= n; i++) if (s[i] == want) hit = 1
                if (!hit || tolower(f["enabled"]) ~ /^[ \t]*no[ \t]*$/ || f["types"] !~ /(^|[ \t])deb([ \t]|$)/) return
                print "Types: deb"
                print "URIs:" f["uris"]
                print "Suites: trixie"
                print "Components:" f["components"]
                if ("signed-by" in f) print "Signed-By:" f["signed-by"]
                done = 1
            }
            BEGIN { reset() }
            FNR == 1 && NR > 1 { emit(); reset() }
            /^#/ { next }
            /^[ \t]*$/ { emit(); reset(); next }
            /^[ \t]/ { if (key != "") f[key] = f[key] "\n" $0; next }
            { i = index($0, ":"); if (!i) next; key = tolower(substr($0, 1, i - 1)); f[key] = substr($0, i + 1) }
            END { emit() }
        ' "${files[@]}"
        return 0
    fi
    files=()
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do [[ -f $f ]] && files+=("$f"); done
    (( ${#files[@]} )) || return 0
    awk -v want="$codename" '
        $1 != "deb" { next }
        {
            opts = ""; i = 2
            if ($2 ~ /^\[/) { while (i <= NF) { opts = opts " " $i; if ($i ~ /\]$/) { i++; break }; i++ } }
            uri = $i; suite = $(i + 1); comps = ""
            for (j = i + 2; j <= NF && $j !~ /^#/; j++) comps = comps " " $j
            if (suite != want) next
            print "Types: deb"; print "URIs: " uri; print "Suites: trixie"; print "Components:" comps
            if (match(opts, /signed-by=[^] ]+/)) print "Signed-By: " substr(opts, RSTART + 10, RLENGTH - 10)
            exit
        }' "${files[@]}"
}

write_if_changed() {  # write_if_changed <file> <content>: 0 if the file changed, 1 if it already matched
    local file=$1 content=$2
    if [[ -f $file && $(<"$file") == "$content" ]]; then return 1; fi
    if ! { printf '%s\n' "$content" >"$file.tmp" && mv "$file.tmp" "$file"; }; then
        die "cannot write $file" "check that /etc/apt is writable"
    fi
    say "wrote $file"
    return 0
}

setup_trixie() {
    if [[ $OS_ID != debian ]]; then
        say "trixie source: not added on $OS_ID (it is for Debian hosts only)"
        return 0
    fi
    local major=${OS_VERSION%%.*}
    if [[ $OS_CODENAME == trixie || ( $major =~ ^[0-9]+$ && $major -ge 13 ) || -z $OS_VERSION ]]; then
        say "trixie source: not needed on $OS_CODENAME"
        return 0
    fi
    local stanza
    stanza=$(main_source_stanza "$OS_CODENAME")
    [[ -n $stanza ]] || die "cannot derive a trixie apt source" "no enabled apt source in /etc/apt/sources.list.d/*.sources or sources.list has suite '$OS_CODENAME'"

    local changed=0
    write_if_changed "$TRIXIE_SOURCES" "# hostagent ./install.sh --dev: Debian trixie, for test tools only.
# Copied from the $OS_CODENAME source; pinned low by $TRIXIE_PIN.
$stanza" && changed=1
    write_if_changed "$TRIXIE_PIN" "# hostagent ./install.sh --dev: nothing comes from trixie unless asked for by name (pkg/trixie).
Package: *
Pin: release n=trixie
Pin-Priority: 100" && changed=1

    if (( changed )) || ! compgen -G '/var/lib/apt/lists/*_dists_trixie_*Release' >/dev/null; then
        say "apt-get update (trixie source added)"
        if ! apt-get -q update; then
            rm -f "$TRIXIE_SOURCES"
            die "apt-get update with the trixie source failed (removed $TRIXIE_SOURCES again)" \
                "check the output above; an old debian-archive-keyring may lack the trixie keys (apt-get install debian-archive-keyring)"
        fi
        APT_UPDATED=1
    else
        say "trixie source: present and pinned to priority 100"
    fi
}

# --- virtualenv ---------------------------------------------------------------------------------

venv_ok() {
    [[ -x $VENV/bin/python && -f $VENV/pyvenv.cfg ]] || return 1
    grep -Eq '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" || return 1
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null
}

setup_venv() {
    local dev=$1 want stamp=$VENV/.hostagent-install
    [[ -x $SYS_PYTHON ]] || die "$SYS_PYTHON not found" "python3-venv should have pulled it in; try: apt-get install python3"
    if ! venv_ok; then
        if [[ -e $VENV ]]; then
            say "virtualenv: $VENV is not a $SYS_PYTHON venv with system site packages; recreating it"
        else
            say "virtualenv: creating $VENV"
        fi
        "$SYS_PYTHON" -m venv --clear --system-site-packages "$VENV" \
            || die "cannot create the virtualenv $VENV" "check that python3-venv is installed and the checkout is writable"
        "$VENV/bin/python" -m pip install -q --upgrade pip \
            || die "cannot upgrade pip in $VENV" "check access to PyPI (pip config / PIP_INDEX_URL)"
        rm -f "$stamp"
    fi

    # Re-install only when pyproject.toml or the extra changed; --dev is a superset of the plain install.
    local sum
    sum=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
    want="$sum dev=$dev"
    if [[ -f $stamp ]] && { [[ $(<"$stamp") == "$want" ]] || [[ $dev == 0 && $(<"$stamp") == "$sum dev=1" ]]; } \
        && "$VENV/bin/python" -c 'import importlib.metadata as m; m.distribution("hostagent")' 2>/dev/null; then
        say "virtualenv: hostagent already installed in $VENV"
        return 0
    fi
    local target=.
    [[ $dev == 1 ]] && target=".[dev]"
    say "virtualenv: pip install -e '$target'"
    (cd "$ROOT" && "$VENV/bin/python" -m pip install -q -e "$target") \
        || die "pip install -e '$target' failed" "see the pip output above; PyPI must be reachable"
    echo "$want" >"$stamp"
}

# --- VictoriaMetrics (--dev) --------------------------------------------------------------------

setup_victoria_metrics() {
    bash "$ROOT/.ci/fetch-victoria-metrics.sh" \
        || die "fetching VictoriaMetrics failed" "see the message above; or point HOSTAGENT_VM_BIN at a victoria-metrics binary"
}

# --- checks -------------------------------------------------------------------------------------

verify() {
    local bcc=$1
    "$VENV/bin/python" -c 'import agent' \
        || die "'import agent' fails in $VENV" "see the error above; re-run ./install.sh after fixing it"
    if [[ $bcc == 1 ]]; then
        "$VENV/bin/python" -c 'import bcc' \
            || die "'import bcc' fails in $VENV" "bcc comes from python3-bpfcc under /usr/lib/python3/dist-packages; the venv must use $SYS_PYTHON with --system-site-packages"
    fi
    local v
    v=$("$VENV/bin/hostagent" version) \
        || die "'$VENV/bin/hostagent version' failed" "see the error above; re-run ./install.sh after fixing it"
    say "ok: $v in $VENV (run: $VENV/bin/hostagent run)"
}

main() {
    local dev=0 arg
    for arg in "$@"; do
        case $arg in
            --dev) dev=1 ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown argument '$arg'" "the only option is --dev" 2 ;;
        esac
    done
    local start=$SECONDS
    detect_os
    require_root "$@"

    # The run side of CO-RE is libbpf1 alone. bcc and kernel headers are the fallback where the
    # kernel has no BTF, and the tests' second loader.
    local bcc=$dev
    if [[ ! -e $BTF ]]; then
        bcc=1
        say "kernel without BTF ($BTF absent): the probes load through bcc, which needs kernel headers"
    fi
    # Fresh hosts (containers, minimal images) have no package lists at all.
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || apt_update
    local core=1 pkgs=(python3-venv ca-certificates)
    if ! installed libbpf1 && [[ -z $(candidate libbpf1) ]]; then
        core=0 bcc=1
        say "no libbpf1 in the apt sources (Ubuntu 22.04 has only libbpf0, 0.5, which the CO-RE loader cannot use): the probes load through bcc"
    else
        build_tool_packages
        pkgs+=(libbpf1 "${BUILD_TOOLS[@]}")
    fi
    if [[ $bcc == 1 ]]; then
        pkgs+=(python3-bpfcc)
    fi
    if [[ $dev == 1 ]]; then
        pkgs+=(bpfcc-tools nftables iproute2 e2fsprogs util-linux procps gcc libc6-dev curl rpm systemd python3-seccomp prometheus-node-exporter
              systemd-container debootstrap)
    fi
    apt_install "${pkgs[@]}"
    if [[ $core == 1 ]]; then
        build_objects
    fi
    if [[ $bcc == 1 ]]; then
        setup_headers
    fi
    setup_tracefs
    if [[ $dev == 1 ]]; then
        setup_trixie
    fi
    setup_venv "$dev"
    if [[ $dev == 1 ]]; then
        setup_victoria_metrics
    fi
    verify "$bcc"
    say "done in $((SECONDS - start))s"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
