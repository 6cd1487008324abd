"""The trainers package's shape: no import circle (each module imports on its own), one
optimization loop (``engine.fit``) that every loop in ``fastcl/trainers`` goes through."""
import ast
import os
import subprocess
import sys

import fastcl.trainers

PACKAGE = os.path.dirname(fastcl.trainers.__file__)
ROOT = os.path.dirname(os.path.dirname(PACKAGE))


def _modules():
    for directory, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, os.path.dirname(os.path.dirname(PACKAGE)))[:-3].split(os.sep)
                yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(module: str, path: str, is_package: bool):
    """Every fastcl.trainers module ``path`` imports, at the top or inside a function."""
    tree = ast.parse(open(path).read())
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("fastcl.trainers"):
                yield target


def test_no_import_circle_between_trainer_modules():
    modules = dict(_modules())
    graph = {name: {t for t in _imports(name, path, path.endswith("__init__.py")) if t in modules and t != name}
             for name, path in modules.items()}
    package_inits = {name for name, path in modules.items() if path.endswith("__init__.py")}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node] - package_inits:  # a package's __init__ re-exporting is not a circle
                if nxt == start:
                    return trail + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in (cycle_from(m) for m in graph if m not in package_inits) if c]
    assert not cycles, cycles[0]


def test_each_trainer_module_imports_on_its_own():
    names = sorted(name for name, _ in _modules() if not name.endswith("__main__"))
    script = ("import importlib, sys\n"
              "import torch\n"
              f"for name in {names!r}:\n"
              "    for loaded in [m for m in sys.modules if m.startswith('fastcl')]:\n"
              "        del sys.modules[loaded]\n"
              "    importlib.import_module(name)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_one_optimization_loop():
    """Only engine.fit steps an optimizer: the engine's loop, CCN's ablation and BPR-MF use it."""
    stepping = []
    for name, path in _modules():
        for node in ast.walk(ast.parse(open(path).read())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step"
                    and isinstance(node.func.value, ast.Name) and "optim" in node.func.value.id):
                stepping.append(name)
    assert stepping == ["fastcl.trainers.engine"], stepping
