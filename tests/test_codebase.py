"""Properties of the code base itself: every config key acts, and the package has no import circle."""

import ast
from pathlib import Path

from sdlora.config import describe

PACKAGE = Path(__file__).resolve().parents[1] / "sdlora"


def _metadata_values(tree: ast.AST) -> set[int]:
    """The nodes of `ss_*` / `modelspec.*` metadata values: a key that only reaches the metadata
    does nothing for training."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and str(key.value).startswith(("ss_", "modelspec.")):
                    found |= {id(n) for n in ast.walk(value)}
    return found


def _package_trees() -> list[ast.AST]:
    trees = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        if path == PACKAGE / "config.py":  # its validation reads every key; only Config's own accessors count
            tree = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
        trees.append(tree)
    return trees


def _keys_read(sections: set[str]) -> tuple[set[str], set[str]]:
    """({"section.key" read as cfg.section.key or through a name bound to cfg.section}, {every
    attribute name read}).

    A name is bound to a section by `tc = cfg.train` (tuples too), by passing cfg.section (or a
    bound name) as an argument (the parameter of a package function of that name is bound), or
    is `self.section` inside Config. `cfg` / `config` / `self.cfg` are the config's names."""
    trees = _package_trees()
    functions: dict[str, list] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.setdefault(node.name, []).append(node)
    bound: dict[str, set[str]] = {s: set() for s in sections}

    def sections_of(node, in_config: bool) -> set[str]:
        if isinstance(node, ast.Name):
            return {s for s, names in bound.items() if node.id in names}
        if not (isinstance(node, ast.Attribute) and node.attr in sections):
            return set()
        root = node.value
        root_name = root.attr if isinstance(root, ast.Attribute) else getattr(root, "id", None)
        return {node.attr} if root_name in ("cfg", "config") or (in_config and root_name == "self") else set()

    for _ in range(3):  # bindings through bindings
        for tree in trees:
            in_config = isinstance(tree, ast.ClassDef)
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign):
                    pairs = [(t, node.value) for t in node.targets]
                    pairs += [(name, value) for t in node.targets if isinstance(t, ast.Tuple)
                              and isinstance(node.value, ast.Tuple) for name, value in zip(t.elts, node.value.elts)]
                    for target, value in pairs:
                        if isinstance(target, ast.Name) and not isinstance(value, ast.Name):
                            for section in sections_of(value, in_config):
                                bound[section].add(target.id)
                elif isinstance(node, ast.Call):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                    for i, arg in enumerate(node.args):
                        for section in sections_of(arg, in_config):
                            for function in functions.get(name, []):
                                params = [p.arg for p in function.args.posonlyargs + function.args.args]
                                params = params[1:] if params[:1] in (["self"], ["cls"]) else params
                                if i < len(params):
                                    bound[section].add(params[i])
                    for keyword in node.keywords:
                        for section in sections_of(keyword.value, in_config) if keyword.arg else ():
                            bound[section].add(keyword.arg)
    keys, names = set(), set()
    for tree in trees:
        in_config, metadata = isinstance(tree, ast.ClassDef), _metadata_values(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and id(node) not in metadata:
                keys |= {f"{section}.{node.attr}" for section in sections_of(node.value, in_config)}
                names.add(node.attr)
    return keys, names


def test_every_config_key_is_read_outside_the_config_module():
    """A key that only config.py (or only an ss_* metadata entry) reads does nothing for the user.
    `section.key` must be read from that section (not some other object's `.key`); the keys a
    [[dataset.subsets]] table shares with [dataset] are read from the subset objects (whatever
    their variable), and top-level keys from the Config, so those are matched by name."""
    from sdlora.config import SUBSET_SHARED_KEYS

    all_keys = [key for key, _, _ in describe()]
    sections = {key.split(".")[0] for key in all_keys if "." in key and "[]" not in key}
    keys, names = _keys_read(sections)
    by_name = [k for k in all_keys if "." not in k or "[]" in k
               or (k.startswith("dataset.") and k.split(".")[1] in SUBSET_SHARED_KEYS)]
    unread = [k for k in all_keys if (k.rsplit(".", 1)[-1] not in names if k in by_name else k not in keys)]
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
    assert "sdlora.training.loop" in graph and graph["sdlora.training.loop"]  # the graph was really read


def test_only_the_cli_layer_parses_arguments():
    """Stages return data and raise UserError; argparse lives in commands/ and cli.py alone."""
    cli_layer = {PACKAGE / "cli.py", *(PACKAGE / "commands").glob("*.py")}
    parsing = []
    for path in sorted(set(PACKAGE.rglob("*.py")) - cli_layer):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            if "argparse" in names:
                parsing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not parsing, f"argparse outside commands/ and cli.py: {parsing}"


def _choices(section: str, key: str) -> list:
    import dataclasses

    from sdlora.config import SECTION_CLASSES

    return next(f.metadata["choices"] for f in dataclasses.fields(SECTION_CLASSES[section]) if f.name == key)


def test_config_choices_are_the_tables_that_implement_them():
    """config.py names the choices (it is imported by everything, so it cannot import the
    implementations); each list must be exactly the keys of the table that acts on it."""
    from sdlora.models import flow
    from sdlora.sampling import sampler
    from sdlora.training.optimizers import OPTIMIZERS

    assert _choices("train", "optimizer") == list(OPTIMIZERS)
    assert _choices("sample", "sampler") == list(sampler.SAMPLERS)
    assert _choices("train", "timestep_sampling") == list(flow.TIMESTEP_SAMPLINGS)
    assert _choices("train", "model_prediction_type") == list(flow.MODEL_PREDICTION_TYPES)
    assert _choices("train", "weighting_scheme") == list(flow.WEIGHTING_SCHEMES)


def test_the_dataset_builder_and_the_cli_import_without_torch():
    """Torch (~1.5 s to import) loads only when a stage needs it: a second `sdlora dataset` on an
    unchanged folder, `sdlora config check` and `--help` never do."""
    import subprocess
    import sys

    code = "import sys, sdlora.cli, sdlora.data.dataset, sdlora.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "False"


def test_help_and_argument_parsing_import_no_heavy_library():
    """`sdlora --help`, every `sdlora COMMAND --help` and `--version` answer in a fraction of a second
    (figures: `sdlora bench --parts startup`): building the parser, parsing every command's arguments
    and tuning the allocator load none of torch, numpy, diffusers, transformers, open_clip or PIL."""
    import subprocess
    import sys

    code = """if True:
        import contextlib, io, sys
        from sdlora import cli
        from sdlora.commands.bench import startup_argvs
        argvs = startup_argvs()
        for argv in argvs:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                cli.main(argv)
        cli.build_parser().parse_args(["train", "x.toml", "--set", "train.epochs=1"])
        print(len(argvs), *[m for m in ("torch", "numpy", "diffusers", "transformers", "open_clip", "PIL")
                            if m in sys.modules])"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    count, *heavy = out.stdout.split()
    assert int(count) > 10 and heavy == [], out.stdout + out.stderr[-2000:]


# ---- the layout: layers as folders, imports only go down (shared/docs/design.md) ----

# Lowest first. A module imports from its own folder or from a lower layer, never from a higher one
# or a sibling folder of its own rank. The ground (top-level modules) may import each other.
LAYERS = ["ground", "presets", "models", "data", "adapters", "sampling", "lowrank", "training", "tiny",
          "bench", "run", "ui", "commands", "cli"]
HEAVY = {"torch", "numpy", "diffusers", "transformers", "open_clip", "PIL", "accelerate", "peft",
         "safetensors", "gradio", "tqdm", "torchvision"}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and (PACKAGE / f"{parts[1]}.py").exists()
                           and parts[1] not in LAYERS):
        return "ground"
    return parts[1]


def _sdlora_imports(node: ast.ImportFrom, modules) -> list[str]:
    if node.level or not (node.module or "").startswith("sdlora"):
        return []
    found = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
    return found or [node.module]


def _top_level(tree: ast.Module):
    """The import statements that run when the module is imported (not those under TYPE_CHECKING)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif (isinstance(node, (ast.If, ast.Try))
              and "TYPE_CHECKING" not in ast.unparse(getattr(node, "test", ast.Constant(0)))):
            todo += node.body + node.orelse + [n for h in getattr(node, "handlers", []) for n in h.body]


def test_layers_are_folders_and_imports_only_go_down():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        rank = LAYERS.index(_layer(name))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for target in _sdlora_imports(node, modules):
                    layer = _layer(target) if target != "sdlora" else "ground"
                    if layer != _layer(name) and LAYERS.index(layer) >= rank:
                        wrong.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {target}")
    assert set(LAYERS) - {"ground", "run", "cli"} <= {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(wrong)


def _import_closures(modules) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: third-party libraries loaded by importing it}, {module: sdlora modules imported at
    its top}), following sdlora's own top-level imports."""
    third, own = {}, {}
    for name, path in modules.items():
        third[name], own[name] = set(), set()
        for node in _top_level(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                third[name] |= {a.name.split(".")[0] for a in node.names}
            elif node.level == 0 and not node.module.startswith("sdlora"):
                third[name].add(node.module.split(".")[0])
            for target in _sdlora_imports(node, modules) if isinstance(node, ast.ImportFrom) else ():
                parts = target.split(".")
                own[name] |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(modules)
    loads: dict[str, set[str]] = {}

    def visit(name, path=()):
        if name not in loads:
            found = set(third[name])
            for other in own[name] - {name} - set(path):
                found |= visit(other, (*path, name))
            loads[name] = found
        return loads[name]

    for name in modules:
        visit(name)
    return loads, own


def _closure(roots, own) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += own[name]
    return seen


def test_sibling_imports_are_at_the_top_unless_they_keep_torch_out_of_the_cli():
    """An sdlora import inside a function hides the dependency graph. The one reason allowed: the
    CLI (cli.py, commands/) starts without any heavy library and the dataset builder without torch,
    so a module they load at start-up imports a heavier sibling where it is used."""
    modules = _modules()
    loads, own = _import_closures(modules)
    cli = _closure(["sdlora.cli", *(m for m in modules if m.startswith("sdlora.commands"))], own)
    builder = _closure(["sdlora.data.dataset"], own)
    assert not [m for m in cli if loads[m] & HEAVY] and not [m for m in builder if "torch" in loads[m]]
    hidden = []
    for name, path in modules.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                targets = _sdlora_imports(node, modules) if isinstance(node, ast.ImportFrom) else []
                heavier = set().union(*(loads.get(t, set()) for t in targets)) if targets else set()
                if targets and not ((name in cli and heavier & HEAVY) or (name in builder and "torch" in heavier)):
                    hidden.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
    assert not hidden, "sibling imports inside functions:\n" + "\n".join(sorted(set(hidden)))


ADAPTER_KINDS = {"lora", "locon", "loha", "lokr", "tucker", "dora", "ia3", "glora", "full", "diag-oft", "boft"}


def _string_dispatch(exempt: list[Path], names, method: str, word: str) -> list[str]:
    """Places outside config.py, presets/ (which read the names people write) and `exempt` that compare
    a value with a string `names(value)` accepts, or call `.method(...)` on something named like `word`."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "config.py" or any(e in path.parents for e in [*exempt, PACKAGE / "presets"]):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            compared = (isinstance(node, ast.Compare)
                        and any(isinstance(c, ast.Constant) and isinstance(c.value, str) and names(c.value)
                                for side in (node.left, *node.comparators) for c in ast.walk(side)))
            reparsed = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == method and word in ast.unparse(node.func.value).lower())
            if compared or reparsed:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_adapter_kinds_are_not_dispatched_on_strings_outside_their_units():
    """`if kind == "loha"` towers are how a new kind gets half-supported: each kind is one unit in
    adapters/kinds/ and callers ask it. config.py and presets/ read the names people write."""
    found = _string_dispatch([PACKAGE / "adapters" / "kinds"],
                             lambda value: set(value.lower().split("+")) & ADAPTER_KINDS, "split", "kind")
    assert not found, "string dispatch on adapter kinds:\n" + "\n".join(found)


def test_families_are_not_dispatched_on_strings_outside_their_modules():
    """`if family == "sdxl"` is how a new family (SD3.5, FLUX) would get half-supported: what differs
    per family is asked of its `Family` in models/families/. config.py and presets/ read the names
    people write."""
    from sdlora.models.families import FAMILIES

    found = _string_dispatch([PACKAGE / "models" / "families"], lambda value: value in FAMILIES, "startswith",
                             "family")
    assert not found, "string dispatch on families:\n" + "\n".join(found)
