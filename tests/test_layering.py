"""The package's layers: core is pure PyTorch, imports flow one way, no cycle (TYPE_CHECKING imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nf_lightning"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every nf_lightning module and the nf_lightning modules it names in an import statement."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            edges |= {target for target in targets if target in modules and target != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph()
    assert "nf_lightning.core.run" in graph and "nf_lightning.lightning.strategy" in graph
    assert find_cycle(graph) is None


def test_imports_flow_one_way() -> None:
    """core and models import nothing above them; callbacks never import the strategy."""
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith(("nf_lightning.core", "nf_lightning.models")):
            assert not {e for e in edges if e.startswith(("nf_lightning.lightning", "nf_lightning.cli"))}, name
        if name.startswith("nf_lightning.lightning.") and name != "nf_lightning.lightning.strategy":
            assert "nf_lightning.lightning.strategy" not in edges, name


CORE_MAY_NOT_IMPORT = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "torchvision",
                       "nf_lightning.lightning", "nf_lightning.cli", "nf_lightning.data", "nf_lightning.models")
CORE_EXCEPTIONS = {("nf_lightning.core.meter_check", "nf_lightning.models")}  # its script leaves core in the layout issue


def imported_names(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at any depth (functions, TYPE_CHECKING blocks)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def forbidden_in_core(path: Path, module: str) -> set[str]:
    """The names ``path`` (core module ``module``) imports that core may not."""
    return {
        name for name in imported_names(path)
        for banned in CORE_MAY_NOT_IMPORT
        if (name == banned or name.startswith(banned + ".")) and (module, banned) not in CORE_EXCEPTIONS
    }  # fmt: skip


def test_the_core_rule_catches_a_function_level_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef f():\n    from lightning.pytorch import Trainer\n    import omegaconf\n")
    assert forbidden_in_core(bad, "nf_lightning.core.bad") == {"lightning.pytorch", "lightning.pytorch.Trainer", "omegaconf"}


def test_core_imports_no_lightning_hydra_torchvision_or_the_layers_above() -> None:
    """Read, not run: no module under nf_lightning/core imports what sits above it."""
    core = sorted((PACKAGE / "core").rglob("*.py"))
    assert len(core) > 10
    offenders = {module_name(p): found for p in core if (found := forbidden_in_core(p, module_name(p)))}
    assert offenders == {}
