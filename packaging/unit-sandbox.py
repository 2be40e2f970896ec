#!/usr/bin/python3
"""Run a command confined the way a systemd unit's [Service] settings confine its process, on
machines where systemd is not PID 1 (containers, CI): to check that hostagent still loads its
eBPF probes and exports data under hostagent.service's hardening.

    packaging/unit-sandbox.py /lib/systemd/system/hostagent.service              # its ExecStart
    packaging/unit-sandbox.py /lib/systemd/system/hostagent.service -- hostagent probes

Needs root, Linux >= 5.12 (mount_setattr) and python3-seccomp. Emulated: CapabilityBoundingSet,
NoNewPrivileges, ProtectSystem=strict with ReadWritePaths, StateDirectory, PrivateTmp,
ProtectHome, PrivateDevices, ProtectKernelTunables, ProtectControlGroups, SystemCallFilter (groups
expanded by systemd-analyze, so the same lists systemd would use), SystemCallErrorNumber,
SystemCallArchitectures=native, RestrictAddressFamilies, RestrictNamespaces,
MemoryDenyWriteExecute (the kernel's PR_SET_MDWE, Linux >= 6.3), LimitMEMLOCK, UMask. Whatever
else the unit sets is listed on stderr as not emulated.
"""
from __future__ import annotations

import ctypes
import errno
import os
import resource
import shlex
import stat
import subprocess
import sys

CAPS = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
        "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
        "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
        "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
        "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
        "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"]
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}
CLONE_NEW_ALL = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
EMULATED = {"CapabilityBoundingSet", "NoNewPrivileges", "ProtectSystem", "ReadWritePaths", "StateDirectory",
            "StateDirectoryMode", "PrivateTmp", "ProtectHome", "PrivateDevices", "ProtectKernelTunables",
            "ProtectControlGroups", "SystemCallFilter", "SystemCallErrorNumber", "SystemCallArchitectures",
            "RestrictAddressFamilies", "RestrictNamespaces", "MemoryDenyWriteExecute", "LimitMEMLOCK", "UMask",
            "AmbientCapabilities", "PrivateMounts", "ExecStart"}
# not confinement: how systemd starts, stops and supervises the service
LIFECYCLE = {"Type", "NotifyAccess", "WatchdogSec", "EnvironmentFile", "Environment", "ExecReload", "Restart",
             "RestartSec", "RestartPreventExitStatus", "TimeoutStopSec", "TimeoutStartSec"}

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_SLAVE = 4096, 16384, 1 << 19
AT_RECURSIVE, MOUNT_ATTR_RDONLY, SYS_MOUNT_SETATTR = 0x8000, 0x1, 442
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_MDWE = 38, 24, 65
CLONE_NEWNS = 0x00020000

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def check(result: int, what: str) -> int:
    if result < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return result


def mount(src, target, fstype, flags, data=None) -> None:
    check(libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                     data and data.encode()), f"mount {target}")


def set_readonly(path: str, readonly: bool) -> None:
    """Make the mount at path and every mount below it read-only (or writable)."""
    attr = MountAttr(MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    check(libc.syscall(SYS_MOUNT_SETATTR, -100, path.encode(), AT_RECURSIVE, ctypes.byref(attr),
                       ctypes.sizeof(attr)), f"mount_setattr {path}")


def bind_self(path: str) -> None:
    mount(path, path, None, MS_BIND | MS_REC)


def unit_settings(path: str) -> dict:
    settings, section = {}, None
    for line in open(path):
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def yes(settings: dict, key: str) -> bool:
    return settings.get(key, ["no"])[-1].lower() in ("yes", "true", "1", "on")


def expand(group: str, seen=None) -> set:
    """A system call group as systemd-analyze lists it, nested groups expanded."""
    if not group.startswith("@"):
        return {group}
    seen = seen if seen is not None else set()
    if group in seen:
        return set()
    seen.add(group)
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True,
                         check=True).stdout
    calls = set()
    for line in out.splitlines():
        name = line.strip()
        if line.startswith((" ", "\t")) and name and not name.startswith("#"):
            calls |= expand(name, seen)
    return calls


def syscall_filter(settings: dict):
    """SystemCallFilter (an allow list, as hostagent.service has), RestrictAddressFamilies and
    RestrictNamespaces as one seccomp filter; calls outside it fail with SystemCallErrorNumber."""
    import seccomp  # python3-seccomp

    allowed = None
    for value in settings.get("SystemCallFilter", []):
        deny = value.startswith("~")
        names = set().union(*(expand(n) for n in value.lstrip("~").split()))
        if allowed is None:
            if deny:
                raise SystemExit("unit-sandbox: only an allow-list SystemCallFilter is emulated")
            allowed = expand("@default") | names  # systemd adds @default to allow lists
        else:
            allowed = allowed - names if deny else allowed | names
    if allowed is None:
        raise SystemExit("unit-sandbox: only an allow-list SystemCallFilter is emulated")
    errno_name = settings.get("SystemCallErrorNumber", [None])[-1]
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(getattr(errno, errno_name)) if errno_name
                              else seccomp.KILL_PROCESS)
    # system call -> the argument conditions under which it is allowed ([]: never)
    conditional = {}
    families = settings.get("RestrictAddressFamilies", [""])[-1].split()
    if families:
        conditional["socket"] = [seccomp.Arg(0, seccomp.EQ, FAMILIES[name]) for name in families]
    restrict_ns = yes(settings, "RestrictNamespaces")
    if restrict_ns:
        conditional.update(unshare=[], setns=[], clone=[seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEW_ALL, 0)])
    for name in sorted(allowed):
        try:
            if name == "clone3" and restrict_ns:
                f.add_rule(seccomp.ERRNO(errno.ENOSYS), name)  # as systemd does: callers fall back to clone
            elif name in conditional:
                for arg in conditional[name]:
                    f.add_rule(seccomp.ALLOW, name, arg)
            else:
                f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            pass  # not a system call on this architecture
    return f


def private_dev() -> None:
    """A /dev with only the basic pseudo devices, like PrivateDevices=yes."""
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
    for name, (major, minor) in {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
                                 "urandom": (1, 9), "tty": (5, 0)}.items():
        os.mknod(f"/dev/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    os.mkdir("/dev/shm")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def confine(settings: dict) -> list:
    """Apply everything that must happen with full privileges; returns what is done."""
    done = []
    for name in settings.get("StateDirectory", [""])[-1].split():
        mode = int(settings.get("StateDirectoryMode", ["0755"])[-1], 8)
        os.makedirs(f"/var/lib/{name}", mode=mode, exist_ok=True)
        os.chmod(f"/var/lib/{name}", mode)
    check(libc.unshare(CLONE_NEWNS), "unshare")
    mount(None, "/", None, MS_REC | MS_SLAVE)
    if settings.get("ProtectSystem", [""])[-1] == "strict":
        bind_self("/")
        set_readonly("/", True)
        for api in ("/dev", "/proc", "/sys"):
            set_readonly(api, False)
        done.append("ProtectSystem=strict")
    if yes(settings, "ProtectKernelTunables"):
        for path in ("/proc/sys", "/proc/sysrq-trigger", "/sys"):
            if os.path.exists(path):
                bind_self(path)
                set_readonly(path, True)
        done.append("ProtectKernelTunables")
    if yes(settings, "ProtectControlGroups") and os.path.isdir("/sys/fs/cgroup"):
        bind_self("/sys/fs/cgroup")
        set_readonly("/sys/fs/cgroup", True)
        done.append("ProtectControlGroups")
    writable = [p.lstrip("-") for v in settings.get("ReadWritePaths", []) for p in v.split()]
    writable += ["/var/lib/" + n for n in settings.get("StateDirectory", [""])[-1].split()]
    for path in dict.fromkeys(writable):
        if os.path.exists(path):
            bind_self(path)
            set_readonly(path, False)
    if yes(settings, "PrivateTmp"):
        for path in ("/tmp", "/var/tmp"):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        done.append("PrivateTmp")
    if yes(settings, "ProtectHome"):
        for path in ("/home", "/root", "/run/user"):
            if os.path.isdir(path):
                mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "mode=0000")
        done.append("ProtectHome")
    if yes(settings, "PrivateDevices"):
        private_dev()
        done.append("PrivateDevices")
    if settings.get("LimitMEMLOCK", [""])[-1] == "infinity":
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            done.append("LimitMEMLOCK")
        except (ValueError, OSError) as e:  # this process may lack CAP_SYS_RESOURCE itself
            print(f"unit-sandbox: LimitMEMLOCK not emulated ({e})", file=sys.stderr)
    if settings.get("UMask"):
        os.umask(int(settings["UMask"][-1], 8))
    return done


def drop_privileges(settings: dict) -> list:
    done = []
    if "CapabilityBoundingSet" in settings:
        keep = {c.removeprefix("CAP_") for v in settings["CapabilityBoundingSet"] for c in v.split()}
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
        for number in range(last + 1):
            if number >= len(CAPS) or CAPS[number] not in keep:
                check(libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0), f"drop capability {number}")
        done.append("CapabilityBoundingSet=" + ",".join(sorted(keep)))
    if yes(settings, "NoNewPrivileges") or "SystemCallFilter" in settings:
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        done.append("NoNewPrivileges")
    if yes(settings, "MemoryDenyWriteExecute"):
        if libc.prctl(PR_SET_MDWE, 1, 0, 0, 0) == 0:
            done.append("MemoryDenyWriteExecute")
        else:
            print("unit-sandbox: MemoryDenyWriteExecute not emulated (the kernel has no PR_SET_MDWE)",
                  file=sys.stderr)
    if "SystemCallFilter" in settings or "RestrictAddressFamilies" in settings:
        flt = syscall_filter(settings)
        flt.load()
        done.append("SystemCallFilter, RestrictAddressFamilies, RestrictNamespaces")
    return done


def main(argv) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    settings = unit_settings(argv[1])
    command = argv[3:] if len(argv) > 2 and argv[2] == "--" else shlex.split(settings["ExecStart"][-1])
    ignored = sorted(set(settings) - EMULATED - LIFECYCLE)
    done = confine(settings)
    done += drop_privileges(settings)
    print(f"unit-sandbox: applied {'; '.join(done)}" + (f"; not emulated: {' '.join(ignored)}" if ignored else ""),
          file=sys.stderr, flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
