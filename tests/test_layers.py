"""Every module of voxsparse imports only from its own package and from lower layers.

The order is the one in docs/ARCHITECTURE.md, section "Layers"; LAYERS below encodes it and
``test_layers_match_the_architecture_doc`` checks that the two agree. Modules are read with ``ast``
(nothing is imported), so every import counts: module level, inside functions, under
``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "voxsparse"
DOC = REPO / "docs" / "ARCHITECTURE.md"

# Lowest first; packages of one layer do not import each other. Keep in step with docs/ARCHITECTURE.md
# ("Layers").
LAYERS: tuple[tuple[str, ...], ...] = (
    ("constants", "utils", "geometry"),
    ("structures",),
    ("ops",),
    ("data", "models"),
    ("evaluation",),
    ("engine",),
    ("convert", "stream"),
    ("viz", "benchmark"),
)
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}

# The root package ``voxsparse/__init__.py`` is the facade above every layer (``voxsparse.load_model``
# is resolved from the engine on first use). Any module may import the root itself (``import
# voxsparse`` for ``__version__``): it imports nothing when loaded.
ROOT = "voxsparse"
FACADE_RANK = len(LAYERS)
FREE_ROOT_NAMES = {"__version__"}


def modules(package_dir: Path = PACKAGE, name: str = ROOT) -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of the package and of every module and subpackage under it."""
    yield name, package_dir / "__init__.py"
    for info in pkgutil.iter_modules([str(package_dir)]):
        child = f"{name}.{info.name}"
        if info.ispkg:
            yield from modules(package_dir / info.name, child)
        elif (package_dir / f"{info.name}.py").is_file():
            yield child, package_dir / f"{info.name}.py"


def imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported voxsparse module or name, line) of every import in ``path``, relative ones resolved.

    ``from voxsparse import x`` yields ``voxsparse.x``, so a name of the root counts as the root's
    and a submodule as that submodule.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == ROOT:
                for alias in node.names:
                    yield f"{ROOT}.{alias.name}", node.lineno
            else:
                yield module, node.lineno


def rank_of(name: str, package_dir: Path = PACKAGE) -> tuple[int, str] | None:
    """(layer, top-level package) of a voxsparse module or root name; None outside voxsparse or
    for the root itself and its free names."""
    parts = name.split(".")
    if parts[0] != ROOT or name == ROOT:
        return None
    top = parts[1]
    if top in FREE_ROOT_NAMES:
        return None
    if top not in RANK:
        if (package_dir / top).is_dir() or (package_dir / f"{top}.py").is_file():
            raise AssertionError(f"voxsparse.{top} is in no layer: place it in docs/ARCHITECTURE.md (Layers) and LAYERS")
        return FACADE_RANK, ROOT  # a name defined in the root package, e.g. load_model
    return RANK[top], top


def violations(package_dir: Path = PACKAGE) -> list[str]:
    """One line per import of a higher layer, or of a peer package of the same layer."""
    found = []
    for name, path in modules(package_dir):
        if name == ROOT:
            continue  # the facade may import anything
        own_rank, own = rank_of(name, package_dir)
        for target, line in sorted(imports(name, path), key=lambda item: item[1]):
            ranked = rank_of(target, package_dir)
            if ranked is None:
                continue
            rank, top = ranked
            if top != own and rank >= own_rank:
                found.append(
                    f"{name} (layer {own_rank}, {own}) imports {target} (layer {rank}, {top}) "
                    f"at {path.relative_to(package_dir.parent)}:{line}"
                )
    return found


def test_every_package_has_a_layer():
    tops = {name.split(".")[1] for name, _ in modules() if name != ROOT}
    assert tops <= set(RANK), f"packages in no layer: {sorted(tops - set(RANK))} (docs/ARCHITECTURE.md, Layers)"


def test_no_module_imports_a_higher_layer():
    found = violations()
    assert not found, "imports against the layer order of docs/ARCHITECTURE.md:\n" + "\n".join(found)


def test_layers_match_the_architecture_doc():
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    order = re.search(r"```\n(.*?)\n```", section, re.DOTALL).group(1)
    documented = tuple(
        tuple(p.strip() for p in layer.split(",")) for layer in " ".join(order.split()).split("<")
    )
    assert documented == LAYERS


def test_the_check_sees_upward_and_nested_imports(tmp_path):
    """A data module importing evaluation (at module level, in a function, relatively) is flagged;
    downward imports and the root's version are not."""
    root = tmp_path / "voxsparse"
    for package in ("", "data", "evaluation", "ops"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    (root / "data" / "reader.py").write_text(
        "import voxsparse\n"
        "from voxsparse import __version__\n"
        "from voxsparse.ops import boxes\n"
        "from voxsparse.evaluation.metrics import score\n"
        "def f():\n"
        "    from ..evaluation import metrics\n"
        "    import voxsparse.evaluation.metrics\n"
    )
    (root / "evaluation" / "metrics.py").write_text("from voxsparse.data.reader import f\n")
    found = violations(root)
    assert [line.split(" at ")[0] for line in found] == [
        "voxsparse.data.reader (layer 3, data) imports voxsparse.evaluation.metrics (layer 4, evaluation)",
        "voxsparse.data.reader (layer 3, data) imports voxsparse.evaluation (layer 4, evaluation)",
        "voxsparse.data.reader (layer 3, data) imports voxsparse.evaluation.metrics (layer 4, evaluation)",
    ]
