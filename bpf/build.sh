#!/bin/sh
# Compile every bpf/*.bpf.c to a CO-RE object: bpf/build.sh [OUTDIR]   (default: bpf/build)
#
# OUTDIR/<name>.bpf.o is relocated by libbpf at load time against the running kernel's BTF, so
# one object serves every kernel with BTF; the agent loads it without a compiler or headers.
#
# vmlinux.h (the kernel's types, for CO-RE) is generated here, when OUTDIR has none, from the
# build host's BTF (/sys/kernel/btf/vmlinux, bpftool). Why not a checked-in per-architecture
# header as libbpf-tools does: it is ~3 MB per architecture to keep in the repository and to
# refresh by hand, and ours would have to come from some kernel anyway; the probes only rely on
# field *names* (CO-RE relocates offsets, and bpf_core_field_exists guards fields that come and
# go between kernels), so any recent kernel's header builds objects that load on older and newer
# ones. A build host without BTF can be given a header: VMLINUX_H=/path/to/vmlinux.h.
#
# OUTDIR/syscalls.txt ("<number> <name>" lines) is this architecture's system call table, from
# <asm/unistd.h> (linux-libc-dev, which clang needs anyway): the syscalls probe names system
# calls with it on hosts that have no headers.
#
# Tools: clang-14 (or $CLANG), bpftool, llvm-strip (DWARF is stripped, BTF kept). Fails naming
# the file on the first error.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
clang=${CLANG:-clang-14}
strip=${LLVM_STRIP:-$(command -v llvm-strip-14 || command -v llvm-strip || echo llvm-strip)}

case $(uname -m) in
    x86_64) arch=x86 ;;
    aarch64) arch=arm64 ;;
    s390x) arch=s390 ;;
    ppc64le) arch=powerpc ;;
    riscv64) arch=riscv ;;
    *) echo "bpf/build.sh: unsupported architecture $(uname -m)" >&2; exit 1 ;;
esac

for tool in "$clang" "$strip"; do
    command -v "$tool" >/dev/null || { echo "bpf/build.sh: $tool not found (CLANG=, LLVM_STRIP=)" >&2; exit 1; }
done

mkdir -p "$out"
if [ -n "${VMLINUX_H:-}" ]; then
    cp "$VMLINUX_H" "$out/vmlinux.h"
elif [ ! -s "$out/vmlinux.h" ]; then
    if [ ! -r /sys/kernel/btf/vmlinux ]; then
        echo "bpf/build.sh: no /sys/kernel/btf/vmlinux on this host: set VMLINUX_H" >&2
        exit 1
    fi
    bpftool btf dump file /sys/kernel/btf/vmlinux format c > "$out/vmlinux.h.tmp" ||
        { echo "bpf/build.sh: bpftool could not dump /sys/kernel/btf/vmlinux" >&2; exit 1; }
    mv "$out/vmlinux.h.tmp" "$out/vmlinux.h"
fi

status=0
for src in "$here"/*.bpf.c; do
    name=$(basename "$src" .c)
    obj="$out/$name.o"
    if ! "$clang" -target bpf -g -O2 -Wall -D__TARGET_ARCH_$arch -DHA_CORE \
            -I"$out" -I"$here/include" -c "$src" -o "$obj.tmp"; then
        echo "bpf/build.sh: $src does not compile" >&2
        status=1
        continue
    fi
    if ! "$strip" -g "$obj.tmp" -o "$obj"; then
        echo "bpf/build.sh: $strip failed on $obj" >&2
        status=1
    fi
    rm -f "$obj.tmp"
done

# every __NR_ macro, expanded by the preprocessor (some are defined through others)
if ! printf '#include <asm/unistd.h>\n' | "$clang" -dM -E -x c - > "$out/syscalls.tmp" 2>/dev/null; then
    echo "bpf/build.sh: <asm/unistd.h> not found (install linux-libc-dev)" >&2
    status=1
else
    { echo '#include <asm/unistd.h>'
      sed -n 's/^#define __NR_\([a-z0-9_]*\) .*/HA_SYSCALL \1 __NR_\1/p' "$out/syscalls.tmp"
    } | "$clang" -E -P -x c - | sed -n 's/^HA_SYSCALL \([a-z0-9_]*\) \([0-9][0-9]*\)$/\2 \1/p' \
      | grep -v ' syscalls$' | sort -n > "$out/syscalls.txt"
fi
rm -f "$out/syscalls.tmp"
exit $status
