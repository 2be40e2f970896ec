#!/usr/bin/python3
"""Build hostagent's .deb and .rpm from this checkout.

    packaging/build.py deb [--version V] [--out DIR]     -> DIR/hostagent_<version>_<arch>.deb
    packaging/build.py rpm [--version V] [--out DIR]     -> DIR/hostagent-<version>.<arch>.rpm

(packaging/build-deb.sh and packaging/build-rpm.sh run these.)

What goes in the package:

    /opt/hostagent/agent/         the application (source and byte code)
    /opt/hostagent/bpf/build/     the probes' CO-RE objects (<name>.bpf.o), compiled here by bpf/build.sh
                                  against the build host's BTF and relocated by libbpf at load time
                                  on the target: no compiler, LLVM or kernel headers there; and
                                  syscalls.txt, the system call table the syscalls probe names with
    /opt/hostagent/bpf/           the BPF C programs, beside agent/ where the probes look for them
                                  (the bcc fallback compiles them where a kernel has no BTF)
    /opt/hostagent/venv/          a virtualenv on the distro Python (--system-site-packages: bcc's
                                  Python module, for the fallback, comes only from the distro) with
                                  the dependencies
    /usr/bin/hostagent            -> /opt/hostagent/venv/bin/hostagent
    /etc/hostagent/agent.yaml     the default config (a conffile / %config(noreplace))
    <unitdir>/hostagent.service   /lib/systemd/system (deb), %{_unitdir} (rpm)
    /var/lib/hostagent/           state: persistent queue, file exporter output
    /usr/share/doc/hostagent/     operations and configuration docs

The virtualenv is built at build time, so installing needs no network. It is created in a
staging directory and then relocated to /opt/hostagent: the only places a virtualenv records its
own path are the scripts in venv/bin and pyvenv.cfg (rewritten here) and the source paths inside
byte code (compiled here with the final paths). The build fails if the staging path is left in
any file. The interpreter is bound to the build host's Python X.Y, so the package depends on
exactly that version; build on the distribution release you install on.

Dependencies: libbpf1 (the CO-RE loader opens libbpf.so.1). bcc (python3-bpfcc / python3-bcc)
and kernel headers are only Suggested: they are the fallback for kernels without BTF
(/sys/kernel/btf/vmlinux), and pull LLVM and clang (over 100 MB) onto every host that installs
Recommends. Ubuntu 22.04 has only libbpf0 (0.5): no libbpf.so.1, no bpf_object__next_program
(libbpf 0.6) that the loader walks an object's programs with, and failed calls return error-encoded
pointers instead of NULL and errno (the 1.0 convention; its opt-in, libbpf_set_strict_mode, is 0.6
too). Build the package on Debian 12+ / Ubuntu 23.04+, where libbpf1 exists.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PREFIX = "/opt/hostagent"
NAME = "hostagent"
SUMMARY = "Linux host telemetry agent: eBPF and /proc as OpenTelemetry metrics and logs"
DESCRIPTION = """\
hostagent reads what the kernel knows through eBPF tracepoint probes (run-queue and block I/O
latency, syscalls, TCP retransmits and resets, process exec/exit, OOM kills, fatal signals) and
what /proc knows (the OpenTelemetry Collector's host metrics), and ships both as OTLP metrics and
logs to an OpenTelemetry backend, or to OTLP-JSON files on local disk."""
DEFAULT_MAINTAINER = "hostagent maintainers <hostagent@localhost>"
# Runtime data the application reads besides Python modules.
APP_DIRS = ("agent", "bpf")
SYSCALL_TABLE = "syscalls.txt"      # bpf/build.sh's, beside the objects
DOCS = ("docs/operations.md", "docs/configuration.md")


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"build: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, **kw)
    except subprocess.CalledProcessError as e:
        out = (e.stdout or b"") + (e.stderr or b"") if isinstance(e.stdout, bytes) else \
            (e.stdout or "") + (e.stderr or "")
        raise BuildError(f"{' '.join(map(str, cmd))} failed with status {e.returncode}"
                         + (f":\n{out}" if out else "")) from None


# --- project metadata ----------------------------------------------------------------------------

def project() -> dict:
    path = os.path.join(ROOT, "pyproject.toml")
    with open(path, "rb") as f:
        if tomllib is not None:
            return tomllib.load(f)["project"]
    # Python 3.10 has no tomllib: read the two fields needed from the simple [project] table
    text = open(path, encoding="utf-8").read()
    version = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S).group(1)
    return {"version": version, "dependencies": re.findall(r'"([^"]+)"', deps)}


def package_version(pep440: str) -> str:
    """A PEP 440 version as Debian and RPM order it: pre-releases sort before the release."""
    m = re.fullmatch(r"(\d+(?:\.\d+)*)(?:[-_.]?(a|b|rc)(\d+))?(?:[-_.]?post(\d+))?(?:[-_.]?dev(\d+))?",
                     pep440.strip())
    if not m:
        raise BuildError(f"version {pep440!r} is not a release, pre-, post- or dev-release number")
    release, pre, pre_n, post, dev = m.groups()
    out = release + (f"~{pre}{pre_n}" if pre else "") + (f".post{post}" if post else "")
    return out + (f"~dev{dev}" if dev else "")


def check_version(version: str) -> str:
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+~]*", version):
        raise BuildError(f"version {version!r}: use digits, letters and . + ~ only, starting with a digit")
    return version


# --- the staged tree ---------------------------------------------------------------------------

def python_info(python: str) -> dict:
    code = "import sys, platform; print(sys.version_info[0], sys.version_info[1], platform.machine())"
    major, minor, machine = run([python, "-c", code], capture_output=True, text=True).stdout.split()
    return {"version": f"{major}.{minor}", "machine": machine}


def copy_tree(src: str, dst: str) -> None:
    # bpf/build holds a checkout's own objects (and vmlinux.h): the package's are built afresh
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(
        "__pycache__", "*.pyc", "*.pyo", "*.egg-info", ".*", "build"))


def build_objects(app: str, workdir: str | None) -> None:
    """bpf/build.sh compiles every bpf/<name>.bpf.c; the objects and the system call table ship
    (not vmlinux.h)."""
    sources = sorted(n[:-len(".c")] for n in os.listdir(os.path.join(ROOT, "bpf")) if n.endswith(".bpf.c"))
    out = tempfile.mkdtemp(prefix="hostagent-bpf-", dir=workdir)
    try:
        log(f"BPF objects: bpf/build.sh ({len(sources)} programs)")
        run(["bash", os.path.join(ROOT, "bpf", "build.sh"), out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        missing = [n for n in sources if not os.path.isfile(os.path.join(out, n + ".o"))]
        if missing:
            raise BuildError(f"bpf/build.sh wrote no object for {', '.join(missing)}")
        if not os.path.getsize(os.path.join(out, SYSCALL_TABLE)):
            raise BuildError(f"bpf/build.sh wrote no {SYSCALL_TABLE}")
        dest = os.path.join(app, "bpf", "build")
        os.makedirs(dest)
        for name in [n + ".o" for n in sources] + [SYSCALL_TABLE]:
            shutil.copy(os.path.join(out, name), dest)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def stamp_version(app: str, version: str) -> None:
    """The staged agent/__init__.py reports the package version (`hostagent version`)."""
    path = os.path.join(app, "agent", "__init__.py")
    text = open(path, encoding="utf-8").read()
    new, n = re.subn(r'^__version__\s*=\s*"[^"]*"', f'__version__ = "{version}"', text, flags=re.M)
    if n != 1:
        raise BuildError(f"{path}: no __version__ = \"...\" line to stamp")
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


CONSOLE_SCRIPT = f"""\
#!{PREFIX}/venv/bin/python3 -IB
# hostagent command. -I: no PYTHON* variables, user site or current directory on the path;
# -B: byte code ships with the package, nothing is written under {PREFIX}.
import sys

from agent.main import main

sys.exit(main())
"""


def build_venv(stage_root: str, python: str, deps: list, wheel_cache: str) -> str:
    app = stage_root + PREFIX
    venv = os.path.join(app, "venv")
    log(f"virtualenv on {python} (--system-site-packages)")
    run([python, "-m", "venv", "--system-site-packages", venv])
    vpy = os.path.join(venv, "bin", "python3")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.setdefault("PIP_CACHE_DIR", wheel_cache)
    log(f"dependencies: {' '.join(deps)}")
    # --ignore-installed: everything goes into the venv even when the distro has a version
    # (the package must not depend on whichever python3-* packages the build host happens to have)
    run([vpy, "-m", "pip", "install", "--quiet", "--ignore-installed", "--only-binary=:all:",
         "--no-compile", "--no-warn-script-location", *deps], env=env)
    # pip and setuptools are build tools: the packaged venv is managed by the package, not by pip
    run([vpy, "-m", "pip", "uninstall", "--quiet", "--yes", "pip", "setuptools"], env=env)
    site = site_packages(venv)
    with open(os.path.join(site, "hostagent.pth"), "w") as f:
        f.write(PREFIX + "\n")
    script = os.path.join(venv, "bin", "hostagent")
    with open(script, "w") as f:
        f.write(CONSOLE_SCRIPT)
    os.chmod(script, 0o755)
    return venv


def site_packages(venv: str) -> str:
    lib = os.path.join(venv, "lib")
    (pydir,) = [d for d in os.listdir(lib) if d.startswith("python")]
    return os.path.join(lib, pydir, "site-packages")


def smoke_test(stage_root: str, venv: str, config: str) -> None:
    """Import everything and validate the default config with the staged tree."""
    app = stage_root + PREFIX
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        sys.path.insert(0, {app!r})
        import agent, agent.cli
        assert agent.__file__.startswith({app!r}), agent.__file__
        # every module, so that an import pyproject.toml does not declare fails the build, not the agent
        try:
            import bcc
        except ImportError:
            bcc = None
            print("build: note: bcc is not importable on this build host (python3-bpfcc); "
                  "it is the fallback for kernels without BTF", file=sys.stderr)
        missing = []
        for mod in pkgutil.walk_packages(agent.__path__, "agent."):
            if mod.name.endswith(".__main__"):
                continue
            try:
                importlib.import_module(mod.name)
            except ModuleNotFoundError as e:
                if not (bcc is None and (e.name or "").split(".")[0] == "bcc"):
                    missing.append(f"{{mod.name}} imports {{e.name}}")
        if missing:
            sys.exit("build: error: not installed (missing from pyproject.toml's dependencies?): "
                     + "; ".join(missing))
        import grpc, numpy, psutil, yaml, urllib3, google.protobuf, google.rpc.status_pb2
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
        for mod in (grpc, numpy, psutil, yaml, urllib3, google.protobuf):
            assert mod.__file__.startswith({venv!r}), f"{{mod.__name__}} comes from {{mod.__file__}}"
        sys.exit(agent.cli.main(["check-config", {config!r}]) if {os.geteuid() == 0!r} else 0)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYTHON"))}
    p = subprocess.run([os.path.join(venv, "bin", "python3"), "-I", "-B", "-c", code], env=env,
                       stdout=subprocess.DEVNULL)
    if p.returncode != 0:
        raise BuildError("the staged application does not import or its default config does not "
                         "validate (see above)")


def compile_bytecode(stage_root: str, venv: str) -> None:
    # Source paths inside the byte code are the installed ones; checked-hash byte code stays
    # valid whatever mtimes the package tools give the files, and still notices edited sources.
    run([os.path.join(venv, "bin", "python3"), "-I", "-m", "compileall", "-q", "-j", "2",
         "--invalidation-mode", "checked-hash", "-s", stage_root, "-p", "/", stage_root + PREFIX],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def relocate(stage_root: str, venv: str) -> None:
    """Rewrite the staging path in the venv's scripts and pyvenv.cfg, then prove it is gone."""
    old = (stage_root + PREFIX).encode()
    new = PREFIX.encode()
    targets = [os.path.join(venv, "pyvenv.cfg")]
    bindir = os.path.join(venv, "bin")
    targets += [os.path.join(bindir, n) for n in os.listdir(bindir)
                if not os.path.islink(os.path.join(bindir, n))]
    for path in targets:
        data = open(path, "rb").read()
        if old in data:
            with open(path, "wb") as f:
                f.write(data.replace(old, new))
    leftovers = []
    for dirpath, dirnames, filenames in os.walk(stage_root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                if stage_root in os.readlink(path):
                    leftovers.append(path)
            elif stage_root.encode() in open(path, "rb").read():
                leftovers.append(path)
    if leftovers:
        shown = "\n  ".join(p[len(stage_root):] for p in leftovers[:20])
        raise BuildError(f"the staging path is still recorded in {len(leftovers)} file(s):\n  {shown}")


def normalize_modes(stage_root: str) -> None:
    for dirpath, dirnames, filenames in os.walk(stage_root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, 0o755 if mode & stat.S_IXUSR else 0o644)


def stage(args, unitdir: str) -> tuple[str, dict]:
    """The complete installed tree under a fresh staging root; returns (root, facts)."""
    proj = project()
    py = python_info(args.python)
    stage_root = os.path.realpath(tempfile.mkdtemp(prefix="hostagent-stage-", dir=args.workdir))
    try:
        return stage_root, _stage(args, unitdir, stage_root, proj, py)
    except BaseException:
        if args.keep_stage:
            log(f"staged tree kept in {stage_root}")
        else:
            shutil.rmtree(stage_root, ignore_errors=True)
        raise


def _stage(args, unitdir: str, stage_root: str, proj: dict, py: dict) -> dict:
    app = stage_root + PREFIX
    os.makedirs(app)
    for d in APP_DIRS:
        copy_tree(os.path.join(ROOT, d), os.path.join(app, d))
    stamp_version(app, args.version)
    build_objects(app, args.workdir)
    venv = build_venv(stage_root, args.python, proj["dependencies"], args.wheel_cache)

    etc = stage_root + "/etc/hostagent"
    os.makedirs(etc)
    shutil.copy(os.path.join(HERE, "agent.yaml"), os.path.join(etc, "agent.yaml"))
    smoke_test(stage_root, venv, os.path.join(etc, "agent.yaml"))
    compile_bytecode(stage_root, venv)
    relocate(stage_root, venv)

    os.makedirs(stage_root + unitdir)
    shutil.copy(os.path.join(HERE, "hostagent.service"), stage_root + unitdir + "/hostagent.service")
    os.makedirs(stage_root + "/usr/bin")
    os.symlink(PREFIX + "/venv/bin/hostagent", stage_root + "/usr/bin/hostagent")
    os.makedirs(stage_root + "/var/lib/hostagent")
    docdir = stage_root + "/usr/share/doc/hostagent"
    os.makedirs(docdir)
    for doc in DOCS:
        if os.path.exists(os.path.join(ROOT, doc)):
            shutil.copy(os.path.join(ROOT, doc), docdir)

    normalize_modes(stage_root)
    os.chmod(etc + "/agent.yaml", 0o640)  # may hold endpoints and header secrets
    os.chmod(stage_root + "/var/lib/hostagent", 0o750)
    return {"python": py["version"], "machine": py["machine"]}


# --- deb -----------------------------------------------------------------------------------------

def deb_arch() -> str:
    return run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()


def build_deb(args) -> str:
    for tool in ("dpkg-deb", "dpkg"):
        if not shutil.which(tool):
            raise BuildError(f"{tool} not found (Debian package dpkg)")
    arch = deb_arch()
    root, facts = stage(args, "/lib/systemd/system")
    try:
        major, minor = map(int, facts["python"].split("."))
        # libbpf1: the CO-RE loader; procps: /bin/kill, the unit's ExecReload (not Essential:
        # minimal images lack it)
        depends = [f"python3 (>= {major}.{minor})", f"python3 (<< {major}.{minor + 1})", "libbpf1", "procps"]
        # The bcc fallback, for kernels without BTF: bcc and headers that match the running
        # kernel (the distro's meta package tracks it). Suggested, not Recommended, so that apt's
        # defaults put no compiler on a host (see the module's docstring).
        suggests = ["python3-bpfcc", f"linux-headers-generic | linux-headers-{arch}"]
        debian = os.path.join(root, "DEBIAN")
        os.makedirs(debian)
        size_kib = sum((os.lstat(os.path.join(d, f)).st_size + 1023) // 1024
                       for d, _, files in os.walk(root) for f in files) + 4
        control = {
            "Package": NAME,
            "Version": args.version + (f"-{args.release}" if args.release else ""),
            "Architecture": arch,
            "Maintainer": args.maintainer,
            "Installed-Size": str(size_kib),
            "Depends": ", ".join(depends),
            "Suggests": ", ".join(suggests),
            "Section": "admin",
            "Priority": "optional",
            "Description": SUMMARY + "\n" + "\n".join(
                " " + (line or ".") for line in DESCRIPTION.splitlines()),
        }
        with open(os.path.join(debian, "control"), "w") as f:
            f.writelines(f"{k}: {v}\n" for k, v in control.items())
        with open(os.path.join(debian, "conffiles"), "w") as f:
            f.write("/etc/hostagent/agent.yaml\n")
        with open(os.path.join(debian, "md5sums"), "w") as f:
            for d, _, files in sorted(os.walk(root)):
                if d.startswith(debian):
                    continue
                for name in sorted(files):
                    path = os.path.join(d, name)
                    if not os.path.islink(path) and not path.startswith(root + "/etc/"):
                        digest = hashlib.md5(open(path, "rb").read()).hexdigest()
                        f.write(f"{digest}  {os.path.relpath(path, root)}\n")
        for script in ("postinst", "prerm", "postrm"):
            shutil.copy(os.path.join(HERE, "deb", script), debian)
            os.chmod(os.path.join(debian, script), 0o755)
        for name in ("control", "conffiles", "md5sums"):
            os.chmod(os.path.join(debian, name), 0o644)
        os.chmod(debian, 0o755)
        out = os.path.join(args.out, f"{NAME}_{control['Version']}_{arch}.deb")
        log(f"dpkg-deb -> {out}")
        level = ["-z9"] if args.compression in ("gzip", "xz", "zstd") else []
        run(["dpkg-deb", "--root-owner-group", f"-Z{args.compression}", *level, "--build", root, out],
            stdout=subprocess.DEVNULL)
        return out
    finally:
        if args.keep_stage:
            log(f"staged tree kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


# --- rpm -----------------------------------------------------------------------------------------

RPM_PAYLOAD = {"gzip": "w6.gzdio", "xz": "w6T.xzdio", "zstd": "w9T.zstdio", "none": "w0.ufdio"}


def build_rpm(args) -> str:
    if not shutil.which("rpmbuild"):
        raise BuildError("rpmbuild not found (Debian/Ubuntu package rpm, RHEL/Fedora rpm-build)")
    unitdir = run(["rpm", "--eval", "%{?_unitdir}"], capture_output=True, text=True).stdout.strip()
    defines = {}
    if not unitdir:  # rpm on Debian does not know systemd's macros
        unitdir = "/usr/lib/systemd/system"
        defines["_unitdir"] = unitdir
    root, facts = stage(args, unitdir)
    topdir = tempfile.mkdtemp(prefix="hostagent-rpmbuild-", dir=args.workdir)
    try:
        arch = facts["machine"]
        defines.update({
            "_topdir": topdir,
            "hostagent_version": args.version,
            "hostagent_release": args.release or "1",
            "hostagent_stage": root,
            "hostagent_python": facts["python"],
            "_build_name_fmt": "%%{NAME}-%%{VERSION}.%%{ARCH}.rpm",
            "_binary_payload": RPM_PAYLOAD[args.compression],
            "_rpmdir": os.path.abspath(args.out),
        })
        cmd = ["rpmbuild", "-bb", "--target", arch, "--quiet"]
        for k, v in defines.items():
            cmd += ["--define", f"{k} {v}"]
        cmd.append(os.path.join(HERE, "rpm", "hostagent.spec"))
        out = os.path.join(args.out, f"{NAME}-{args.version}.{arch}.rpm")
        log(f"rpmbuild -> {out}")
        run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if not os.path.exists(out):
            raise BuildError(f"rpmbuild did not write {out}")
        return out
    finally:
        shutil.rmtree(topdir, ignore_errors=True)
        if args.keep_stage:
            log(f"staged tree kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


# --- command line --------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="packaging/build.py", description=__doc__.split("\n\n")[0])
    p.add_argument("format", choices=("deb", "rpm"))
    p.add_argument("--version", help="package version (default: pyproject.toml's, as deb/rpm order it)")
    p.add_argument("--release", default="", help="package revision: deb -N suffix, rpm Release (default 1)")
    p.add_argument("--out", default=os.path.join(ROOT, "dist"), help="output directory (default: dist/)")
    p.add_argument("--python", default="/usr/bin/python3",
                   help="the distro Python the virtualenv is bound to (default /usr/bin/python3)")
    p.add_argument("--compression", choices=sorted(RPM_PAYLOAD), default="zstd",
                   help="payload compression (default zstd: dpkg >= 1.21.18 and rpm >= 4.14 read it)")
    p.add_argument("--maintainer", default=os.environ.get("HOSTAGENT_MAINTAINER", DEFAULT_MAINTAINER))
    p.add_argument("--workdir", default=None, help="where to stage (default: $TMPDIR)")
    p.add_argument("--wheel-cache", default=os.path.join(ROOT, ".cache", "pip"),
                   help="pip's cache (default: .cache/pip in the checkout)")
    p.add_argument("--keep-stage", action="store_true", help="keep the staged tree (printed)")
    args = p.parse_args(argv)
    try:
        args.version = check_version(args.version or package_version(project()["version"]))
        if not os.path.isabs(args.python) or not os.access(args.python, os.X_OK):
            raise BuildError(f"--python {args.python}: not an executable absolute path")
        os.makedirs(args.out, exist_ok=True)
        out = build_deb(args) if args.format == "deb" else build_rpm(args)
    except BuildError as e:
        print(f"build: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
