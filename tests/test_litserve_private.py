"""litserve's private names, contained: only server/litserve_adapter.py uses them, every one it
uses is listed in server/litserve_private.py, and each listed one exists in the installed
litserve."""
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
                           f"its use in server/litserve_adapter.py must be "
                           f"ported before this litserve can be used")


def _litserve_private_members() -> set[str]:
    """Private names defined by litserve's classes (methods and attributes on self)."""
    names = set()
    for path in LITSERVE.rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", text))
        names |= set(re.findall(r"^\s+(?:async\s+)?def (_[a-z]\w*)\(", text, re.M))
    return names


def _private_litserve_uses(path: Path, litserve_names: set[str]) -> set[str]:
    """The private litserve names `path` imports, overrides, calls or reads."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("litserve"):
            used |= {a.name for a in node.names if a.name.startswith("_")}
        name = (node.attr if isinstance(node, ast.Attribute)
                else node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                else None)
        if name and name in litserve_names:
            used.add(name)
    return used


def test_only_the_adapter_uses_private_litserve_names_and_each_is_listed():
    listed = {name.rsplit(".", 1)[1] for name in PRIVATE_NAMES}
    litserve_names = _litserve_private_members()
    adapter = SERVER / "litserve_adapter.py"
    unlisted = _private_litserve_uses(adapter, litserve_names) - listed
    assert not unlisted, (f"server/litserve_adapter.py uses private litserve names not listed "
                          f"in server/litserve_private.py: {sorted(unlisted)}")
    elsewhere = {f"{path.name}: {name}" for path in sorted(SERVER.glob("*.py")) if path != adapter
                 for name in _private_litserve_uses(path, litserve_names)}
    assert not elsewhere, (f"private litserve names used outside server/litserve_adapter.py "
                           f"(move them into the adapter, under a public name): "
                           f"{sorted(elsewhere)}")


def test_the_check_sees_a_private_name_outside_the_adapter(tmp_path):
    module = tmp_path / "other.py"
    module.write_text("from litserve.loops.base import _SENTINEL_VALUE\n"
                      "def f(server):\n    return server._get_request_queue('/x')\n")
    assert _private_litserve_uses(module, _litserve_private_members()) == {
        "_SENTINEL_VALUE", "_get_request_queue"}
