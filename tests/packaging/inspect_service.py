"""Run by a service's own virtualenv's python: `python -I inspect_service.py PACKAGE OUT.json`.

Standard library only, since it runs where only the service's locked dependencies are. It
writes a JSON report:

- `imported` / `failed`: every module of the service package (the app and the entry points
  included; `__main__` starts the service, so it is only read), imported one by one;
- `unresolved`: every import the service's modules make, and every import of the `mlpipe`
  library modules they reach (followed transitively), that does not resolve here. The
  imports are read from the source (ast), so the lazy ones inside functions count, as do
  `importlib.import_module("name")` calls with literal names. Imports under
  `if TYPE_CHECKING:` never run and are skipped; an import inside a `try` that catches
  ImportError is reported with `guarded: true`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import pkgutil
import sys
import traceback
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path

IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


@dataclass(frozen=True)
class Imported:
    module: str  # absolute dotted name
    names: tuple[str, ...]  # `from module import names`; empty for `import module`
    line: int
    guarded: bool


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        (isinstance(t, ast.Name) and t.id in IMPORT_ERRORS)
        or (isinstance(t, ast.Attribute) and t.attr in IMPORT_ERRORS)
        for t in types
    )


def _literal_strings(node: ast.expr) -> list[str] | None:
    if isinstance(node, ast.Tuple | ast.List) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return [e.value for e in node.elts]  # type: ignore[attr-defined]
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, package: str) -> None:
        self.package = package  # the module's package, for relative imports
        self.found: list[Imported] = []
        self._guarded = 0
        self._loop_values: dict[str, list[str]] = {}

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        guards = any(_catches_import_error(h) for h in node.handlers)
        self._guarded += guards
        for child in node.body:
            self.visit(child)
        self._guarded -= guards
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)

    visit_TryStar = visit_Try  # type: ignore[assignment]

    def visit_For(self, node: ast.For) -> None:
        # `for module in ("a", "b"): importlib.import_module(module)`
        values = _literal_strings(node.iter)
        if values is not None and isinstance(node.target, ast.Name):
            self._loop_values[node.target.id] = values
            self.generic_visit(node)
            del self._loop_values[node.target.id]
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append(Imported(alias.name, (), node.lineno, self._guarded > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level:
            module = importlib.util.resolve_name("." * node.level + module, self.package)
        names = tuple(a.name for a in node.names)
        self.found.append(Imported(module, names, node.lineno, self._guarded > 0))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in {"import_module", "__import__"} and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                values = [arg.value]
            elif isinstance(arg, ast.Name):
                values = self._loop_values.get(arg.id, [])
            else:
                values = []
            for value in values:
                self.found.append(Imported(value, (), node.lineno, self._guarded > 0))
        self.generic_visit(node)


def imports_in(path: Path, module: str, is_package: bool) -> list[Imported]:
    collector = _Collector(module if is_package else module.rpartition(".")[0])
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return collector.found


def find(name: str) -> tuple[ModuleSpec | None, str]:
    """The module's spec here, or None and why (finding a submodule imports its parents)."""
    try:
        spec = importlib.util.find_spec(name)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return spec, "" if spec is not None else f"No module named {name!r}"


def is_namespace(spec: ModuleSpec) -> bool:
    # `google` and `google.cloud` exist as soon as any one of their distributions does.
    return spec.submodule_search_locations is not None and spec.origin in (None, "namespace")


def is_submodule(module: str, name: str) -> bool:
    """Whether `from module import name` names a module (not a function or a class)."""
    parent = sys.modules.get(module)
    if parent is not None and not hasattr(parent, "__path__"):
        return False
    spec, _ = find(f"{module}.{name}")
    return spec is not None


def unresolved_names(imp: Imported) -> tuple[str, str]:
    """The module an import needs that is not here and why, or ("", "")."""
    if imp.module == "__future__":
        return "", ""
    spec, why = find(imp.module)
    if spec is None:
        return imp.module, why
    if is_namespace(spec):
        if not imp.names:
            return imp.module, f"{imp.module} is only a namespace package here"
        for name in imp.names:
            if not is_submodule(imp.module, name):
                return f"{imp.module}.{name}", f"No module named '{imp.module}.{name}'"
    return "", ""


def inspect(package: str) -> dict[str, object]:
    top = importlib.import_module(package)
    modules = [package]
    failed: dict[str, str] = {}

    def walk_error(name: str) -> None:
        failed[name] = traceback.format_exc(limit=-3)

    modules += [m.name for m in pkgutil.walk_packages(top.__path__, f"{package}.", walk_error)]

    imported = []
    for name in modules:
        if name.rpartition(".")[2] == "__main__":
            continue  # it starts the service; the entry-point test runs it
        try:
            importlib.import_module(name)
        except BaseException:
            failed[name] = traceback.format_exc(limit=-3)
        else:
            imported.append(name)

    # The service package and the shared library are read and followed; anything else they
    # import must resolve here.
    followed = {package, "mlpipe"}
    queue = list(modules)
    scanned: set[str] = set()
    unresolved: list[dict[str, object]] = []
    while queue:
        name = queue.pop()
        if name in scanned:
            continue
        scanned.add(name)
        spec, _ = find(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue  # reported by the module that imports it
        is_package = spec.submodule_search_locations is not None
        for imp in imports_in(Path(spec.origin), name, is_package):
            missing, why = unresolved_names(imp)
            if missing:
                unresolved.append(
                    {
                        "in": name,
                        "line": imp.line,
                        "module": missing,
                        "error": why,
                        "guarded": imp.guarded,
                    }
                )
            elif imp.module.partition(".")[0] in followed:
                queue.append(imp.module)
                queue += [f"{imp.module}.{n}" for n in imp.names if is_submodule(imp.module, n)]

    library = importlib.import_module("mlpipe")
    return {
        "imported": imported,
        "failed": failed,
        "scanned": sorted(scanned),
        "unresolved": unresolved,
        "library_file": library.__file__,
        "has_app": hasattr(sys.modules.get(f"{package}.main"), "app"),
    }


if __name__ == "__main__":
    package, out = sys.argv[1], Path(sys.argv[2])
    out.write_text(json.dumps(inspect(package), indent=1))
