"""Imports run one way: no module of nbdbackup imports a layer above its own.

The layers are the ones README's "Layout" section describes, top to bottom.
Imports inside functions count too: a lazy import is still a dependency.
A new module must be placed in a layer here, or this test fails.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nbdbackup"

LAYERS = (
    ("command line", {"cli", "__main__", "nbdkit_plugin"}),
    ("engine", {"engine"}),
    ("orchestration", {"backup", "backupimage", "bootcheck", "copy", "keyring", "mounting", "prune",
                       "recovering", "restore", "retention", "rollback", "rollback_live", "serving",
                       "verify"}),
    ("checkpoints", {"checkpoints", "chain"}),
    ("adapters", {"qmp", "vm", "pointintime", "nbdio", "storage_daemon", "guestagent", "capture",
                  "pipeline", "rawimage", "repository", "config", "inuse"}),
    ("records and rules", {"records", "errors", "names", "lock", "workdirs", "units", "metrics"}),
)


def layer_of(module: str) -> int:
    """Index of the layer of ``module`` ('cli.backup' -> its top-level name's); 0 is the top."""
    top = module.split(".")[0]
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"nbdbackup/{module.replace('.', '/')}.py is in no layer of tests/test_layers.py")


def imports_of(path: Path) -> set[str]:
    """nbdbackup modules imported anywhere in ``path``, relative to the package ('repository.s3')."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return imports_in(path.read_text(), list(parts if path.name == "__init__.py" else parts[:-1]))


def imports_in(source: str, package: list[str]) -> set[str]:
    """nbdbackup modules that ``source``, a module of subpackage ``package``, imports anywhere."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(["nbdbackup", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # "from . import backup" imports a module; "from .records import Disk" a name of one
            names = [f"{module}.{alias.name}" if node.module is None else module for alias in node.names]
        else:
            continue
        for name in names:
            if name == "nbdbackup" or name.startswith("nbdbackup."):
                relative = name.removeprefix("nbdbackup").lstrip(".")
                if relative:
                    found.add(relative)
    return found


def test_every_import_points_down_or_sideways():
    upward = []
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 40
    for path in modules:
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        for imported in imports_of(path):
            if layer_of(imported) < own:
                upward.append(f"{module} ({LAYERS[own][0]}) imports {imported} "
                              f"({LAYERS[layer_of(imported)][0]})")
    assert upward == []


def test_an_upward_import_is_found():
    """The check itself sees relative, absolute and lazy imports."""
    source = "from .engine import x\nimport nbdbackup.cli\ndef f():\n    from .. import backup\n"
    assert imports_in(source, ["repository"]) == {"repository.engine", "cli", "backup"}
    assert layer_of("backup") < layer_of("repository.s3")
