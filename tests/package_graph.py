"""The import graph of the tdx_rules package, read from its source with ``ast``.

Every import counts, at module level or inside a function, relative (``from ..x import``)
or absolute (``from tdx_rules.x import``, ``import tdx_rules.x``). Modules are named by
their path relative to the package directory (``rootfs/tree.py``).
"""

import ast
import os

import tdx_rules

PACKAGE = os.path.dirname(os.path.abspath(tdx_rules.__file__))


def modules():
    """Every module of the package, as package-relative paths."""
    found = []
    for top, dirs, names in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        found += [os.path.relpath(os.path.join(top, n), PACKAGE) for n in sorted(names) if n.endswith(".py")]
    return found


def _file_of(dotted_parts):
    """The module file for ``tdx_rules.<parts>`` (a module or a package), or None."""
    base = os.path.join(*dotted_parts) if dotted_parts else ""
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if candidate != ".py" and os.path.exists(os.path.join(PACKAGE, candidate)):
            return os.path.normpath(candidate)
    return None


def imports_of(relpath):
    """The package's modules that ``relpath`` imports."""
    tree = ast.parse(open(os.path.join(PACKAGE, relpath)).read())
    package = os.path.dirname(relpath).split(os.sep) if os.path.dirname(relpath) else []
    found = set()

    def add(parts, names=()):
        hit = False
        for name in names:
            sub = _file_of(parts + [name])
            if sub is not None:
                found.add(sub)
                hit = True
        if not hit and _file_of(parts) is not None:
            found.add(_file_of(parts))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                add(base + [p for p in (node.module or "").split(".") if p], [a.name for a in node.names])
            elif node.module and node.module.split(".")[0] == "tdx_rules":
                add(node.module.split(".")[1:], [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tdx_rules":
                    add(alias.name.split(".")[1:])
    found.discard(relpath)
    return found


def closure(relpath):
    """``relpath`` and everything it imports, directly or not."""
    seen, todo = set(), [relpath]
    while todo:
        item = todo.pop()
        if item not in seen:
            seen.add(item)
            todo.extend(imports_of(item))
    return seen
