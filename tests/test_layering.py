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
    assert "nf_lightning.core.train.run" in graph and "nf_lightning.lightning.strategy" in graph
    assert find_cycle(graph) is None


def imported_names(path: Path) -> set[str]:
    """Every absolute module name an import statement in ``path`` names (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


CORE_MUST_NOT_IMPORT = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "torchvision",
                        "nf_lightning.lightning", "nf_lightning.cli", "nf_lightning.data", "nf_lightning.models")  # fmt: skip


def test_imports_flow_one_way() -> None:
    """core imports nothing above it (nor Lightning, Hydra or torchvision); callbacks never import the strategy."""
    graph = import_graph()
    for path in (PACKAGE / "core").rglob("*.py"):
        above = {n for n in imported_names(path) if any(n == m or n.startswith(f"{m}.") for m in CORE_MUST_NOT_IMPORT)}
        assert not above, (path, above)
    for name, edges in graph.items():
        if name.startswith("nf_lightning.models"):
            assert not {e for e in edges if e.startswith(("nf_lightning.lightning", "nf_lightning.cli"))}, name
        if name.startswith("nf_lightning.lightning.") and name != "nf_lightning.lightning.strategy":
            assert "nf_lightning.lightning.strategy" not in edges, name


def test_the_layer_check_sees_a_function_level_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import lightning.pytorch as pl\n    from nf_lightning.models import vgg\n")
    assert {"lightning.pytorch", "nf_lightning.models", "nf_lightning.models.vgg"} <= imported_names(module)

