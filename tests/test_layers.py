"""The layers of docs/design.md hold: the import-linter contracts of pyproject.toml are kept, no
module of agent/ imports another inside a function (the way a cycle hides), and each component
in a registry table has its row in the docs, so adding one shows where its documentation goes."""
import ast
import importlib
import pathlib
import re
import subprocess
import sys
import tomllib

from tests.helpers import ROOT, clean_env, doc_rows

AGENT = pathlib.Path(ROOT, "agent")

# (importing module, imported module) -> why the import waits for a call. Only for a module whose
# import pulls in a heavy third-party library that a command or a host may never need (e.g. bcc),
# or what the entry point does before the agent is imported; never to break a cycle: move the
# shared code down a layer instead (docs/design.md).
DEFERRED = {
    ("agent.main", "agent.cli"): "`hostagent run` attaches the probes of its last start first (early.py): the "
                                 "agent's imports take some 100 ms",
    ("agent.export.factory", "agent.export.otlp_grpc"): "grpcio costs an agent about 14 MB of RSS; the file "
                                                        "and HTTP exporters never need it",
    ("agent.export.factory", "agent.export.otlp_http"): "urllib3 and the zstd/lz4 codecs cost about 8 MB of RSS; "
                                                        "the file and gRPC exporters never need them",
    ("agent.export.factory", "agent.export.wal"): "the persistent queue's crc32c and lz4 cost about 3 MB of RSS; "
                                                  "a memory queue never needs them",
}


def test_import_contracts_are_kept():
    lint = pathlib.Path(sys.executable).parent / "lint-imports"
    p = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[p.stdout.find("Broken contracts"):] + p.stderr


def test_every_module_has_its_layer():
    """A new module of agent/ is placed in the layers contract, or nothing would check its imports."""
    with open(pathlib.Path(ROOT, "pyproject.toml"), "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    placed = {name.strip().strip("()") for layer in layers for name in re.split(r"[|:]", layer)}
    modules = {p.stem for p in AGENT.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in AGENT.glob("*/__init__.py")}
    assert modules <= placed, f"in no layer of pyproject.toml: {sorted(modules - placed)}"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(module: str, is_package: bool, node) -> list[str]:
    """The modules an import statement of `module` reads (`from agent import x` reads agent.x when
    that is a module, else agent)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")[:len(module.split(".")) + is_package - node.level]
        package = ".".join(base + ([node.module] if node.module else []))
    else:
        package = node.module
    return [f"{package}.{alias.name}" if _is_module(f"{package}.{alias.name}") else package for alias in node.names]


def _is_module(name: str) -> bool:
    path = pathlib.Path(ROOT, *name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def function_level_imports() -> dict:
    """{(importing module, imported module): {('agent/x.py', line), ...}} for every import of an
    agent module written inside a function body."""
    found = {}
    for path in sorted(AGENT.rglob("*.py")):
        module = _module_name(path)
        for func in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for name in _imported(module, path.name == "__init__.py", node):
                        if name == "agent" or name.startswith("agent."):
                            found.setdefault((module, name), set()).add((str(path.relative_to(ROOT)), node.lineno))
    return found


def test_no_agent_module_is_imported_inside_a_function():
    found = function_level_imports()
    places = sorted((path, line, module, name) for (module, name), wheres in found.items()
                    if (module, name) not in DEFERRED for path, line in wheres)
    unexplained = "\n".join(f"{path}:{line}: {module} imports {name}" for path, line, module, name in places)
    assert not unexplained, f"imports inside functions (move the shared code down a layer):\n{unexplained}"
    assert set(DEFERRED) <= set(found), f"DEFERRED lists imports that are gone: {set(DEFERRED) - set(found)}"


def test_function_level_imports_are_found():
    """The lister above reads relative and absolute imports alike."""
    assert _imported("agent.export.queue", False, ast.parse("from .wal import X").body[0]) == ["agent.export.wal"]
    assert _imported("agent.export", True, ast.parse("from . import wal").body[0]) == ["agent.export.wal"]
    assert _imported("agent.sources.host", False, ast.parse("from ..model import M").body[0]) == ["agent.model"]
    assert _imported("agent.cli", False, ast.parse("import agent.runtime").body[0]) == ["agent.runtime"]
    assert _imported("agent.cli", False, ast.parse("from agent import profiling, __version__").body[0]) == [
        "agent.profiling", "agent"]


def _table(name: str) -> dict:
    """A registry table (name -> Factory): agent.components holds them, agent.export.factory the
    exporter's."""
    for module in ("agent.components", "agent.export.factory"):
        try:
            table = getattr(importlib.import_module(module), name, None)
        except ModuleNotFoundError:
            continue
        if table is not None:
            return table
    raise AssertionError(f"no registry table {name} in agent.components or agent.export.factory")


def _backquoted(text: str) -> set:
    return set(re.findall(r"`([^`]+)`", text))


def test_every_scraper_has_its_doc_rows():
    keys = doc_rows()
    metrics = pathlib.Path(ROOT, "docs", "metrics.md").read_text()
    sections = set(re.findall(r"^## (\S+)$", metrics, re.M))
    for name in _table("SCRAPERS"):
        assert f"scrapers.{name}.enabled" in keys, f"docs/configuration.md has no row scrapers.{name}.enabled"
        assert name in sections, f"docs/metrics.md has no section '## {name}'"


def test_every_exporter_and_queue_has_its_doc_row():
    keys = doc_rows()
    for table, key in (("EXPORTERS", "exporter.type"), ("QUEUES", "exporter.queue.type")):
        named = _backquoted(keys[key][1])
        for name in _table(table):
            assert name in named, f"docs/configuration.md: the meaning of {key} does not name `{name}`"


def test_test_modules_share_code_through_helpers_only():
    """A test module imports shared code from tests/helpers.py (fixtures come from conftest.py
    without an import), never from conftest or from another test module."""
    wrong = []
    for path in sorted(pathlib.Path(ROOT, "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "tests" else [node.module]
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                last = name.rpartition(".")[2]
                if name.startswith("tests.") and (last == "conftest" or last.startswith("test_")):
                    wrong.append(f"tests/{path.name}:{node.lineno}: imports {name}")
    assert not wrong, "\n".join(wrong)
