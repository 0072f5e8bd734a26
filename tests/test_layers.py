"""The one floor plan: cli -> app -> plan -> stages -> models. A module never imports a layer above its
own, and project modules import each other without circles. Read from the source with ast, so
function-level and TYPE_CHECKING imports count too."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "models", "training")
LAYERS = ("models", "stages", "plan", "app", "cli")  # bottom to top
APP_MODULES = frozenset({"pipeline.run", "pipeline.assemble", "pipeline.demo"})


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    module_level: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def layer_of(module: str) -> str:
    package = module.split(".")[0]
    if module == "pipeline.cli":
        return "cli"
    if module in APP_MODULES or package == "training":
        return "app"
    if package == "pipeline":
        return "plan"  # every other pipeline module, new ones included
    return package


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def project_target(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that `name` is or lies inside (`models.vae.Vae` -> `models.vae`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    module_level = {id(node) for node in tree.body} | {
        id(child) for node in tree.body if isinstance(node, ast.If | ast.Try) for child in ast.walk(node)
    }
    found: set[Import] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, path.name == "__init__.py", node)
            names = [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        at_top = id(node) in module_level and not is_type_checking_only(node, tree)
        for name in names:
            target = project_target(name, modules)
            if target is not None and target != module:
                found.add(Import(module, target, node.lineno, at_top))
    return sorted(found, key=lambda imp: (imp.line, imp.imported))


def is_type_checking_only(node: ast.stmt, tree: ast.Module) -> bool:
    """Imports under `if TYPE_CHECKING:` do not run, so they cannot close a circle (they still count for layers)."""
    for block in tree.body:
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
            if any(child is node for child in ast.walk(block)):
                return True
    return False


def all_imports() -> list[Import]:
    modules = project_modules()
    return [imp for module, path in modules.items() for imp in imports_of(module, path, modules)]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(edges):
        if root in state:
            continue
        path: list[str] = [root]
        stack = [iter(sorted(edges.get(root, ())))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def test_every_module_has_a_layer() -> None:
    assert {layer_of(module) for module in project_modules()} <= set(LAYERS)


def test_no_module_imports_a_layer_above_its_own() -> None:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [
        f"{imp.importer} ({layer_of(imp.importer)}) imports {imp.imported} ({layer_of(imp.imported)}) at line {imp.line}"
        for imp in all_imports()
        if rank[layer_of(imp.imported)] > rank[layer_of(imp.importer)]
    ]
    assert not upward, "imports that reach a layer above their own:\n" + "\n".join(upward)


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for imp in all_imports():
        if imp.module_level or not module_level_only:
            edges.setdefault(imp.importer, set()).add(imp.imported)
    return edges


def test_project_modules_import_without_circles() -> None:
    cycle = find_cycle(import_graph(module_level_only=True))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_function_level_import_hides_a_circle() -> None:
    """A function-level import that would close a circle at module level only dodges it."""
    cycle = find_cycle(import_graph(module_level_only=False))
    assert cycle is None, "import circle (counting function-level imports): " + " -> ".join(cycle or [])


def test_find_cycle_reports_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layer_of_places_the_training_wing_and_new_pipeline_modules() -> None:
    assert layer_of("pipeline.cli") == "cli"
    assert layer_of("training.occlusion") == "app"
    assert layer_of("pipeline.demo") == "app"
    assert layer_of("pipeline.ledger") == "plan"
    assert layer_of("stages.inpaint") == "stages"
