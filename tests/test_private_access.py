"""No module of nf_lightning reaches into another object's private attributes.

An attribute whose name starts with one underscore belongs to the object's own
class: it is read and written through ``self`` (or ``cls``) only. Lightning's
private internals are the one exception, and they live in
``nf_lightning/lightning/_internals.py`` alone (each checked by ``tests/test_internals.py``): no other
module imports a private name from Lightning, reaches the Trainer's loops or names a private attribute
of something imported from Lightning (a patch target).
Module-level private names (``module._helper``) are not attributes of an object
and are not checked; dunder names (``__class__``) are public protocol.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nf_lightning"
ALLOWED_FILES = {PACKAGE / "lightning" / "_internals.py"}
MODULE_REGISTRIES = {"_parameters", "_buffers"}
"""``nn.Module``'s own registries of parameters and buffers: budgeted neuron updates turn a conv's rows into
parameters and buffers and swap a module's tensors for the previous epoch's without copying them, as
``torch.nn.utils.parametrize`` does; allowed there and nowhere else."""
REGISTRY_USERS = {PACKAGE / "neuron_budget" / name for name in ("partial.py", "trainable.py", "kept_state.py")}
OWN = {"self", "cls"}


def private_accesses(source: str) -> list[tuple[int, str]]:
    """``(line, "obj._name")`` for every private attribute reached through something other than self/cls."""
    tree = ast.parse(source)
    modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}  # fmt: skip
    modules |= {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in OWN:
            continue
        root = owner
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name) and root.id in modules:  # a module's private name (nn.modules.batchnorm._BatchNorm)
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        found.append((node.lineno, f"{ast.unparse(owner)}.{name}"))
    return found


def test_the_check_finds_a_reach_into_another_object() -> None:
    source = ("from torch import nn\nclass A:\n    def f(self, run):\n"
              "        return self._x, run._val_input, super()._y, self.meter._add, nn.modules._Base\n")
    assert private_accesses(source) == [(4, "run._val_input"), (4, "self.meter._add")]


def findings(check: Callable[[str], list[tuple[int, str]]], exempt: Callable[[Path, str], bool] = lambda *_: False
             ) -> list[str]:  # fmt: skip
    """``path:line: what`` for each finding of ``check`` in nf_lightning outside ``ALLOWED_FILES``, but the exempt."""
    return sorted({
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path in PACKAGE.rglob("*.py")
        if path not in ALLOWED_FILES
        for line, what in check(path.read_text())
        if not exempt(path, what)
    })  # fmt: skip


def registry_use(path: Path, what: str) -> bool:
    """Whether ``what`` in ``path`` is one of the allowed uses of ``MODULE_REGISTRIES``."""
    return path in REGISTRY_USERS and what.rpartition(".")[2] in MODULE_REGISTRIES


def test_no_module_reaches_into_another_objects_private_attributes() -> None:
    assert findings(private_accesses, registry_use) == []


LOOPS = {"fit_loop", "validate_loop", "test_loop", "predict_loop"}
"""The Trainer's loops: Lightning's undocumented machinery, reached from ``_internals.py`` alone."""


def lightning_internals(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each reach into Lightning's internals: a private name imported from it, a Trainer
    loop, or a string naming a private attribute of something imported from Lightning (a patch target)."""
    import importlib

    tree = ast.parse(source)
    found, imported = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lightning":
            module = importlib.import_module(node.module)
            for alias in node.names:
                imported.append(getattr(module, alias.name, None))
                if alias.name.startswith("_") or any(part.startswith("_") for part in node.module.split(".")):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
        elif isinstance(node, ast.Attribute) and node.attr in LOOPS:
            found.append((node.lineno, ast.unparse(node)))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        private = node.value.startswith("_") and not node.value.startswith("__") and node.value.isidentifier()
        if private and any(hasattr(obj, node.value) for obj in imported):
            found.append((node.lineno, repr(node.value)))
    return found


def test_the_lightning_check_finds_private_imports_loops_and_patch_targets() -> None:
    source = ("from lightning.fabric.plugins.io import torch_io\n"
              "from lightning.pytorch.core.optimizer import _configure_optimizers\n"
              "def f(trainer):\n    trainer.fit_loop.setup_data()\n"
              "    return (torch_io, '_atomic_save'), '_mine', '__name__'\n")
    assert lightning_internals(source) == [(2, "from lightning.pytorch.core.optimizer import _configure_optimizers"),
                                           (4, "trainer.fit_loop"), (5, "'_atomic_save'")]  # not '_mine'  # fmt: skip


def test_lightning_internals_are_reached_from_one_module() -> None:
    assert findings(lightning_internals) == []
    assert lightning_internals((PACKAGE / "lightning" / "_internals.py").read_text())  # the check sees them there
