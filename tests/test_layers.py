"""The code's layers: a core under compiler/ that imports neither passes/ nor runtime/,
passes/ and runtime/ on the core only, and only the top (CLI, compile driver, sweep)
importing both. Read from the sources' ASTs, every import statement, function-local too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"compiler": "eiec", "passes": "eiec.passes", "runtime": "eiec.runtime"}
TOP = {"eiec.cli", "eiec.driver", "eiec.sweep"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The eiec modules `name` imports (relative imports resolved; `from eiec import x` is eiec.x)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
    modules = _modules()
    return {m for m in found if m in modules and m != name}


def _layer(module: str) -> str:
    if module in TOP:
        return "top"
    if module.startswith("eiec.passes"):
        return "passes"
    if module.startswith("eiec.runtime"):
        return "runtime"
    return "core"


ALLOWED = {"core": {"core"}, "passes": {"core", "passes"}, "runtime": {"core", "runtime"},
           "top": {"core", "passes", "runtime", "top"}}


def test_every_import_goes_down_the_layers():
    assert {"eiec.isa", "eiec.passes.lower", "eiec.runtime.executor"} <= set(_modules())  # the tree was found
    wrong = [f"{name} ({_layer(name)}) imports {dep} ({_layer(dep)})"
             for name, path in _modules().items() for dep in sorted(_imports(name, path))
             if _layer(dep) not in ALLOWED[_layer(name)]]
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_relative_and_function_local_imports():
    imports = _imports("eiec.storage", ROOT / "compiler" / "storage.py")
    assert {"eiec.huffman", "eiec.codec", "eiec.tiling"} <= imports
    assert "eiec.runtime.session" in _imports("eiec.cli", ROOT / "compiler" / "cli.py")  # inside a function


# Where an eiec module may import another inside a function, and why: the CLI loads only
# what the subcommand runs (`eiec --help` and `eiec inspect` start without onnxruntime's
# custom ops), and `eiec.runtime` registers its custom ops only when a session is asked for.
LAZY = {"eiec.cli", "eiec.runtime"}


def test_eiec_modules_import_each_other_at_module_top():
    """A function-local import between eiec modules hides a dependency (often a cycle) from the reader."""
    local = []
    for name, path in _modules().items():
        if name in LAZY:
            continue
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("eiec")):
                        local.append(f"{name}:{node.lineno} in {fn.name}")
                    elif isinstance(node, ast.Import) and any(a.name.startswith("eiec") for a in node.names):
                        local.append(f"{name}:{node.lineno} in {fn.name}")
    assert not local, "\n".join(local)
