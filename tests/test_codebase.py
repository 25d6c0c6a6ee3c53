"""Properties of the code base itself: every config key acts, and the package has no import circle."""

import ast
from pathlib import Path

from sdlora.config import describe

PACKAGE = Path(__file__).resolve().parents[1] / "sdlora"


def _attributes_read(tree: ast.AST) -> set[str]:
    """Names read as attributes (`cfg.train.seed` -> seed), leaving out the values of `ss_*` /
    `modelspec.*` metadata entries: a key that only reaches the metadata does nothing for training."""
    metadata_values = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and str(key.value).startswith(("ss_", "modelspec.")):
                    metadata_values |= {id(n) for n in ast.walk(value)}
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and id(n) not in metadata_values}


def test_every_config_key_is_read_outside_the_config_module():
    """A key that only config.py (or only an ss_* metadata entry) reads does nothing for the user."""
    read = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if path.name == "config.py":  # its validation reads every key; only Config's own accessors count
            tree = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
        read |= _attributes_read(tree)
    unread = [key for key, _, _ in describe() if key.rsplit(".", 1)[-1] not in read]
    assert not unread, f"config keys read nowhere: {unread}"


def _import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):  # function-level (lazy) imports count too
            if isinstance(node, ast.ImportFrom):
                parts = package.split(".")
                base = (parts[: len(parts) - node.level + 1] if node.level else [])
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {c for c in candidates if c in modules and c != name}
    return graph


def test_the_package_has_no_import_circle():
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(f"import circle: {' -> '.join(path[path.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "sdlora.train" in graph and graph["sdlora.train"]  # the graph was really read
