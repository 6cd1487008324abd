"""The ops floor's rules, read from the sources: every op folder has the same core files, imports
the shared floor (``fastcl/ops/common``) and never another op's internals, the floor imports no
op, and no import circle joins two op folders."""
import ast
import os

import fastcl.ops

OPS = os.path.dirname(fastcl.ops.__file__)
FOLDERS = sorted(name for name in os.listdir(OPS) if os.path.isfile(os.path.join(OPS, name, "__init__.py")))
OP_FOLDERS = [name for name in FOLDERS if name != "common"]


def _imports(folder: str):
    """(file, imported op folder, imported submodule or None, names) for every import of
    another folder of fastcl/ops, at the top of a file or inside a function."""
    for name in sorted(os.listdir(os.path.join(OPS, folder))):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(OPS, folder, name)).read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 2 and node.module:  # from ..other[.sub] import names
                parts = node.module.split(".")
            elif node.level == 0 and node.module and node.module.startswith("fastcl.ops."):
                parts = node.module.split(".")[2:]
            else:
                continue
            if parts[0] != folder:
                yield name, parts[0], ".".join(parts[1:]) or None, [alias.name for alias in node.names]


def test_every_op_folder_has_the_core_files():
    for folder in OP_FOLDERS:
        present = set(os.listdir(os.path.join(OPS, folder)))
        assert {"__init__.py", "naive.py", "options.py"} <= present, (folder, sorted(present))


def test_no_op_imports_another_ops_internals():
    wrong = []
    for folder in OP_FOLDERS:
        for file, other, submodule, names in _imports(folder):
            if other == "common":
                continue
            public = getattr(__import__(f"fastcl.ops.{other}", fromlist=["__all__"]), "__all__", [])
            if submodule is not None or not set(names) <= set(public):
                wrong.append(f"ops/{folder}/{file} imports ops/{other}{'/' + submodule if submodule else ''}: {names}")
    assert not wrong, "\n".join(wrong)


def test_the_floor_imports_no_op():
    assert [(file, other) for file, other, _, _ in _imports("common")] == []


def test_no_import_circle_between_op_folders():
    edges = {folder: {other for _, other, _, _ in _imports(folder) if other != "common"} for folder in OP_FOLDERS}

    def reaches(start, target, seen=()):
        return any(nxt == target or (nxt not in seen and reaches(nxt, target, seen + (nxt,))) for nxt in edges[start])

    assert [folder for folder in OP_FOLDERS if reaches(folder, folder)] == []
