"""litserve's private names, contained: every one the server uses is listed in
server/litserve_private.py, and each listed one exists in the installed litserve."""
import ast
import importlib
import inspect
import re
from importlib import metadata
from pathlib import Path

import litserve
import pytest

from server.litserve_private import PRIVATE_NAMES

SERVER = Path(__file__).resolve().parents[1] / "server"
LITSERVE = Path(litserve.__file__).parent


def _instance_attributes(cls: type) -> set[str]:
    """Private attributes litserve's own code assigns on `self` in `cls` (and its bases)."""
    names = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("litserve"):
            names |= set(re.findall(r"self\.(_\w+)\s*[:=]", inspect.getsource(klass)))
    return names


def _exists(dotted: str) -> bool:
    module_name, _, rest = dotted.rpartition(".")
    try:  # a module-level name
        return hasattr(importlib.import_module(module_name), rest)
    except ImportError:
        pass
    module_name, cls_name = module_name.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    return cls is not None and (hasattr(cls, rest) or rest in _instance_attributes(cls))


@pytest.mark.parametrize("name", sorted(PRIVATE_NAMES))
def test_every_listed_private_name_exists_in_the_installed_litserve(name):
    version = metadata.version("litserve")
    assert _exists(name), (f"litserve {version} no longer has {name} ({PRIVATE_NAMES[name]}): "
                           f"the server's use of it (server/app.py, server/apis.py) must be "
                           f"ported before this litserve can be used")


def _litserve_private_members() -> set[str]:
    """Private names defined by litserve's classes (methods and attributes on self)."""
    names = set()
    for path in LITSERVE.rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", text))
        names |= set(re.findall(r"^\s+(?:async\s+)?def (_[a-z]\w*)\(", text, re.M))
    return names


def test_the_server_uses_no_unlisted_private_litserve_name():
    listed = {name.rsplit(".", 1)[1] for name in PRIVATE_NAMES}
    litserve_names = _litserve_private_members()
    unlisted = set()
    for path in sorted(SERVER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("litserve"):
                unlisted |= {f"{path.name}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and a.name not in listed}
            name = (node.attr if isinstance(node, ast.Attribute)
                    else node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    else None)
            if name and name in litserve_names and name not in listed:
                unlisted.add(f"{path.name}: {name}")
    assert not unlisted, (f"private litserve names used but not listed in "
                          f"server/litserve_private.py: {sorted(unlisted)}")
