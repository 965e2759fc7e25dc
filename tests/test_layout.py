"""The layout the README's "How it is built" draws: which modules of recbole_llm import which, read from the source.
Models are leaves (as in RecBole): they import layers, llm/, the leaf modules errors, checkpoint and environment, and
RecBole, never the run, the trainer, the config machinery or the lookups; llm/ imports only itself and errors; no
cycles."""

import ast
import os

import pytest

from conftest import TESTS_DIR

PACKAGE_DIR = os.path.join(os.path.dirname(TESTS_DIR), "recbole_llm")
LEAVES = {"recbole_llm.errors", "recbole_llm.checkpoint", "recbole_llm.environment"}


def module_imports():
    """{module: the recbole_llm modules it imports}, for every module of the package."""
    imports = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in (file for file in files if file.endswith(".py")):
            path = os.path.join(folder, name)
            module = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[: -len(".py")].replace(os.sep, ".")
            with open(path) as file:
                tree = ast.parse(file.read())
            imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
            imports[module.removesuffix(".__init__")] = {m for m in imported if m and m.startswith("recbole_llm")}
    return imports


@pytest.mark.parametrize(
    "room, allowed",
    [
        ("recbole_llm.model", ("recbole_llm.model", "recbole_llm.llm", *LEAVES)),
        ("recbole_llm.llm", ("recbole_llm.llm", "recbole_llm.errors")),
    ],
)
def test_models_and_llms_stand_below_the_run_the_trainer_and_the_config(room, allowed):
    wrong = {
        module: sorted(m for m in imported if not m.startswith(allowed))
        for module, imported in module_imports().items()
        if module.startswith(room)
    }
    assert not {module: imported for module, imported in wrong.items() if imported}


def test_no_module_imports_itself_through_others():
    imports = module_imports()
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for imported in imports.get(module, ()):
            visit(imported)
        path.pop()
        done.add(module)

    for module in imports:
        visit(module)
