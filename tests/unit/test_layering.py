"""The shape of ``p2ptrain/``, checked from its source with ``ast`` (no import-linter dependency):
modules import only from lower layers (so imports are acyclic and nothing imports upward), and no
module or class grows past what a reader takes in at one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "p2ptrain"

# Lowest first. A module may import modules of lower layers only; the peer package's parts are
# ordered among themselves the same way.
LAYERS: list[set[str]] = [
    {"sorting"},
    {"schema", "logs", "native", "metrics", "wire", "aggregate", "checkpoint", "accumulator", "retry", "asgi",
     "status", "attack", "poster", "momentum", "memory", "bulkread", "cost"},
    {"aggregation_spec"},
    {"spec", "dbupdate", "redis_server", "ledger"},
    {"config", "data", "models", "summary"},
    {"store", "preflight", "device"},
    {"gradient", "autoscale", "peer.errors", "peer.context"},
    {"peer.replica", "peer.divergence", "scrape_targets", "function_server"},
    {"peer.recovery", "peer.inbox", "peer.report", "peer.update"},
    {"peer.receiver", "peer.resync", "peer.closing"},
    {"peer.sender", "peer.functions", "peer.endpoint", "peer.attacker"},
    {"peer.inline", "peer.ps_round"},
    {"peer.round", "ps.aggregator", "ps.local"},
    {"peer.process", "ps"},
    {"peer"},
    {"local"},
    {"cli"},
    {"__main__"},
]
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "p2ptrain"


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name).is_dir()


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):  # function-level (lazy) imports count too
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "p2ptrain":
            package = "" if node.module == "p2ptrain" else node.module.removeprefix("p2ptrain.") + "."
            submodules = {package + a.name for a in node.names if _is_module((package + a.name).replace(".", "/"))}
            if node.module != "p2ptrain" and len(submodules) < len(node.names):
                found.add(node.module.removeprefix("p2ptrain."))  # names defined in the module itself
            found |= submodules
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("p2ptrain.") for a in node.names if a.name.split(".")[0] == "p2ptrain"}
    return found


def _sources() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    for number, layer in enumerate(LAYERS):
        if module in layer:
            return number
    raise AssertionError(f"p2ptrain.{module} is in no layer of tests/unit/test_layering.py: add it where it belongs")


def test_every_module_imports_only_from_lower_layers() -> None:
    upward = []
    for module, tree in _sources().items():
        if module == "p2ptrain":
            continue
        for imported in _imports(tree):
            if _layer(imported) >= _layer(module):
                upward.append(f"p2ptrain.{module} imports p2ptrain.{imported}")
    assert upward == []


@pytest.mark.parametrize("limit_kind", ["module", "class"])
def test_modules_and_classes_stay_small(limit_kind: str) -> None:
    too_big = []
    for module, tree in _sources().items():
        if limit_kind == "module":
            lines = max((getattr(n, "end_lineno", 0) or 0) for n in ast.walk(tree))
            if lines > MAX_MODULE_LINES:
                too_big.append(f"p2ptrain.{module}: {lines} lines")
        else:
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                    too_big.append(f"p2ptrain.{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_big == []


def test_the_checker_sees_an_upward_import() -> None:
    tree = ast.parse("from p2ptrain.peer import Peer\nimport p2ptrain.local\n")
    assert _imports(tree) == {"peer", "local"}
    assert _layer("peer") > _layer("store")
