"""The package's layers (pyproject.toml, checked by `lint-imports` in the test command) name every module, and the
import graph has no circle, function-local imports included."""

import ast
import pathlib

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "locallearn"


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def test_every_module_is_in_a_layer_of_the_contract():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    named = {m.strip() for layer in contracts[0]["layers"] for m in layer.split("|")}
    missing = [
        m for m in sorted(_modules()) if m != "locallearn" and not any(m == n or m.startswith(n + ".") for n in named)
    ]
    assert missing == [], f"add these modules to a layer in pyproject.toml: {missing}"


def test_no_import_circle_between_modules_even_inside_functions():
    """Every `from locallearn.x import y`, at any depth of a module, as an edge between modules: no cycle."""
    mods = _modules()

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("locallearn"):
                for alias in node.names:
                    target = resolve(f"{node.module}.{alias.name}")
                    # a package's __init__ re-exporting its own modules is not a circle through the package
                    if target and target != name and not (target.startswith(name + ".") and path.name == "__init__.py"):
                        edges[name].add(target)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if nxt == "locallearn":
                continue  # the package root only re-exports the API
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in sorted(mods):
        if module not in state:
            visit(module, [])
