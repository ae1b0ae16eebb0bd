"""The size and shape limits the product keeps (docs/code-map.md): read with ast, nothing is
imported. Each limit is checked against the product's own files, and the checker itself on a
small source written here, so a broken checker cannot pass silently."""
import ast
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("configs", "data", "networks", "third_party", "trainer", "util")
# A ratchet: lowered whenever the product shrinks, towards issue 33's 6,500 (8,915 before it).
MAX_PRODUCT_LINES = 6500
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_CLASS_LINES, MAX_LINE_CHARS = 400, 60, 200, 100


def product_files():
    files = [os.path.join(REPO, "main.py")]
    for package in PACKAGES:
        for root, dirs, names in os.walk(os.path.join(REPO, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    return sorted(files)


def oversized(source, name="<source>"):
    """Every limit `source` breaks, as readable strings."""
    lines = source.split("\n")
    problems = []
    if source.count("\n") > MAX_FILE_LINES:
        problems.append(f"{name}: {source.count(chr(10))} lines")
    problems += [f"{name}:{i}: {len(line)} characters"
                 for i, line in enumerate(lines, 1) if len(line) > MAX_LINE_CHARS]
    for node in ast.walk(ast.parse(source)):
        limit = {ast.FunctionDef: MAX_FUNCTION_LINES, ast.AsyncFunctionDef: MAX_FUNCTION_LINES,
                 ast.ClassDef: MAX_CLASS_LINES}.get(type(node))
        if limit and node.end_lineno - node.lineno + 1 > limit:
            problems.append(f"{name}:{node.lineno}: {node.name} has "
                            f"{node.end_lineno - node.lineno + 1} lines")
    return problems


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_the_checker_finds_each_kind_of_excess():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = f"def long():\n{body}\n\ndef short():\n    return 1\n# {'x' * MAX_LINE_CHARS}\n"
    problems = oversized(source)
    assert problems == [f"<source>:{MAX_FUNCTION_LINES + 5}: {MAX_LINE_CHARS + 2} characters",
                        f"<source>:1: long has {MAX_FUNCTION_LINES + 1} lines"]
    methods = "\n".join(f"    def m{i}(self):\n        return {i}\n" for i in range(67))
    assert oversized(f"class Big:\n{methods}") == ["<source>:1: Big has 201 lines"]
    assert oversized("pass\n" * (MAX_FILE_LINES + 1)) == [f"<source>: {MAX_FILE_LINES + 1} lines"]
    assert oversized("pass\n" * MAX_FILE_LINES) == []


def test_no_product_file_function_class_or_line_over_its_limit():
    problems = [p for path in product_files()
                for p in oversized(read(path), os.path.relpath(path, REPO))]
    assert problems == []


def test_the_product_stays_under_its_line_budget():
    counts = {os.path.relpath(p, REPO): read(p).count("\n") for p in product_files()}
    total = sum(counts.values())
    biggest = sorted(counts.items(), key=lambda item: -item[1])[:5]
    assert total <= MAX_PRODUCT_LINES, f"{total} lines; the largest files: {biggest}"


def quoting_modules(name):
    """The product modules with `name` as a string literal in their code (not in docstrings
    or comments)."""
    found = []
    for path in product_files():
        tree = ast.parse(read(path))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)}
        if any(isinstance(n, ast.Constant) and n.value == name and id(n) not in docstrings
               for n in ast.walk(tree)):
            found.append(os.path.relpath(path, REPO))
    return found


def test_quoting_modules_sees_code_but_not_prose(tmp_path, monkeypatch):
    (tmp_path / "code.py").write_text('"""MNIST in a docstring."""\nNAME = "MNIST"\n')
    (tmp_path / "prose.py").write_text('"""MNIST."""\n# "MNIST" in a comment\nX = 1\n')
    monkeypatch.setattr(sys.modules[__name__], "product_files",
                        lambda: [str(tmp_path / "code.py"), str(tmp_path / "prose.py")])
    assert [os.path.basename(p) for p in quoting_modules("MNIST")] == ["code.py"]


def registered_names():
    """The dataset and variant names, read from the experiment files (what users type)."""
    names = set()
    for name in os.listdir(os.path.join(REPO, "configs")):
        if name.endswith(".yaml"):
            text = read(os.path.join(REPO, "configs", name))
            names.update(re.findall(r"^\s+(?:name|param_var_q):\s*\"?(\w+)", text, re.M))
    return sorted(names - {"resnet", "resnet_label", "GaussianSQVAE", "VmfSQVAE", "VQVAE"})


def test_the_experiment_files_name_datasets_and_variants():
    names = registered_names()
    assert {"MNIST", "CIFAR10", "CelebAMask_HQ", "gaussian_1", "gaussian_4", "vmf"} <= set(names)


@pytest.mark.parametrize("name", registered_names())
def test_each_dataset_and_variant_name_is_written_in_at_most_two_product_modules(name):
    found = quoting_modules(name)
    assert len(found) <= 2, f"{name!r} is written in {found}"
