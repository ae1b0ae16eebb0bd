"""The import graph of the product: every import statement of every module, those inside
functions included, read with ast (nothing is imported), between our own modules.

An import inside a function is still a dependency: it only hides a cycle until the function
runs. A package that imports its own submodules (trainer/__init__.py) is not an edge back
from them: Python finishes a package's __init__ before its submodules can import it.
"""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("configs", "data", "networks", "third_party", "trainer", "util")
SCRIPTS = ("main.py",)


def product_modules():
    """Module name -> (file, whether it is a package's __init__)."""
    modules = {name[:-3]: (os.path.join(REPO, name), False) for name in SCRIPTS}
    for package in PACKAGES:
        for root, dirs, files in os.walk(os.path.join(REPO, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            dotted = os.path.relpath(root, REPO).replace(os.sep, ".")
            for name in sorted(files):
                if name.endswith(".py"):
                    init = name == "__init__.py"
                    modules[dotted if init else f"{dotted}.{name[:-3]}"] = (
                        os.path.join(root, name), init)
    return modules


def imported_names(tree, module, is_package):
    """What each import statement in `tree` asks for, anywhere in the file: a dotted name
    (`import X.Y`), or (X, name) for `from X import name` with relative X made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                yield (base, alias.name), node.lineno


def import_graph():
    """Our module -> {our module it imports: first line that does}."""
    modules = product_modules()
    graph = {}
    for module, (path, is_package) in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges = graph.setdefault(module, {})
        for name, line in imported_names(tree, module, is_package):
            if isinstance(name, tuple):
                # `from X import name`: the module X.name where there is one (X, a package,
                # is then only its namespace), else a name defined in X.
                base, attribute = name
                name = f"{base}.{attribute}" if f"{base}.{attribute}" in modules else base
            # The deepest of our modules the dotted name starts with.
            parts = name.split(".")
            target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1)
                           if ".".join(parts[:n]) in modules), None)
            if target and target != module:
                edges.setdefault(target, line)
    return graph


def find_cycle(graph):
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # main.py imports all but util.cli inside functions (start-up stays fast); `from
    # trainer import commands` is the module, `from trainer import RunError` the package.
    assert {"util.cli", "configs", "data", "trainer", "trainer.commands", "util.device",
            "util.io"} <= set(graph["main"])
    assert "trainer.runs" in graph["trainer.commands"]  # `from . import runs`


def test_no_import_cycle_between_product_modules():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_util_and_third_party_import_nothing_of_ours_outside_them():
    for module, edges in import_graph().items():
        top = module.split(".")[0]
        if top in ("util", "third_party"):
            assert {t.split(".")[0] for t in edges} <= {top}, (module, edges)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) is None
