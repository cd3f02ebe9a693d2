"""litserve beyond its public API, contained: only server/litserve_adapter.py uses such names,
every one it uses is listed in server/litserve_private.py, each listed one exists in the
installed litserve, and every other server module uses litserve's public API alone."""
import ast
import builtins
import functools
import importlib
import inspect
import re
from importlib import metadata
from pathlib import Path

import litserve
import pytest

from server.litserve_private import PRIVATE_NAMES, PUBLIC_NAMES

SERVER = Path(__file__).resolve().parents[1] / "server"
ADAPTER = SERVER / "litserve_adapter.py"
LITSERVE = Path(litserve.__file__).parent
# Bases that make a server class a litserve class: what it defines, litserve may call or read.
LITSERVE_BASES = {"LitAPI", "LitServer", "BatchedLoop", "RegularRequestHandler",
                  "AdaptedLitServer", "AdaptedRequestHandler", "AdaptedBatchLoop"}


def _instance_attributes(cls: type, package: str = "litserve") -> set[str]:
    """Attributes the code of `package` assigns on `self` in `cls` (and its bases)."""
    names = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith(package):
            names |= set(re.findall(r"self\.(\w+)\s*[:=]", inspect.getsource(klass)))
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
def test_every_listed_name_exists_in_the_installed_litserve(name):
    version = metadata.version("litserve")
    assert _exists(name), (f"litserve {version} no longer has {name} ({PRIVATE_NAMES[name]}): "
                           f"its use in server/litserve_adapter.py must be "
                           f"ported before this litserve can be used")


def _defined(tree: ast.AST) -> set[str]:
    """Names a module defines: functions, classes, attributes set on self, module names."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


@functools.cache
def litserve_names() -> set[str]:
    """Every name litserve's code defines (its modules, classes, methods, self attributes)."""
    names = set()
    for path in LITSERVE.rglob("*.py"):
        if "test_examples" not in path.parts:
            names |= _defined(ast.parse(path.read_text()))
    return names


@functools.cache
def _common_member_names() -> set[str]:
    """Members of the builtin, standard-library and web types every server module handles: a
    name litserve shares with them (get, put, start, status_code) says nothing by itself."""
    import argparse
    import logging
    import multiprocessing
    import queue
    import threading

    import numpy
    import requests
    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException
    from starlette.responses import Response
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    types = [getattr(builtins, n) for n in dir(builtins) if isinstance(getattr(builtins, n), type)]
    types += [queue.Queue, multiprocessing.Process, threading.Thread, logging.Logger,
              argparse.ArgumentParser, argparse.Action, numpy.ndarray]
    names = {name for t in types for name in dir(t)}
    for cls, package in ((FastAPI, "fastapi"), (FastAPI, "starlette"), (Request, "starlette"),
                         (Response, "starlette"), (HTTPException, "starlette"),
                         (requests.Response, "requests"), (HttpToolsProtocol, "uvicorn"),
                         (argparse.Action, "argparse")):
        names |= set(dir(cls)) | _instance_attributes(cls, package)
    return names


@functools.cache
def _shadowable() -> set[str]:
    """The members of the litserve classes the server derives from."""
    from litserve.loops.simple_loops import BatchedLoop
    from litserve.server import RegularRequestHandler
    return {name for cls in (litserve.LitAPI, litserve.LitServer, BatchedLoop,
                             RegularRequestHandler)
            for name in set(dir(cls)) | _instance_attributes(cls)}


def _members(node: ast.ClassDef) -> set[str]:
    """What a class defines on its instances: methods, class attributes, self attributes."""
    names = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names |= {t.id for n in node.body if isinstance(n, (ast.Assign, ast.AnnAssign))
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
              if isinstance(t, ast.Name)}
    names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
              and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name)
              and n.value.id == "self"}
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def _derives(node: ast.ClassDef, litserve_classes: set[str]) -> bool:
    bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases}
    return bool(bases & litserve_classes)


def non_public_uses(path: Path, litserve: set[str], own: set[str], common: set[str]
                    ) -> set[str]:
    """litserve names beyond PUBLIC_NAMES that module `path` imports from litserve, reads or
    calls (a name the server itself defines, or a common type's member, aside), or defines in
    a class derived from a litserve class (an override, or an attribute shadowing one)."""
    tree = ast.parse(path.read_text())
    classes, uses = set(LITSERVE_BASES), set()
    for node in ast.walk(tree):  # the server's own litserve-derived classes, by name
        if isinstance(node, ast.ClassDef) and _derives(node, classes):
            classes.add(node.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 \
                and (node.module or "").startswith("litserve"):
            uses |= {a.name for a in node.names if a.name not in PUBLIC_NAMES}
            if node.module != "litserve":
                uses.add(f"module {node.module}")
        elif isinstance(node, ast.Import):
            uses |= {f"module {a.name}" for a in node.names
                     if a.name.startswith("litserve.")}
        elif isinstance(node, ast.Attribute) and node.attr in litserve - own - common:
            uses.add(node.attr)
        elif isinstance(node, ast.ClassDef) and node.name in classes - LITSERVE_BASES:
            uses |= _members(node) & _shadowable()
    return uses - PUBLIC_NAMES


def _own_names() -> set[str]:
    """What server modules define, but for the litserve members they override."""
    names = set()
    for path in SERVER.glob("*.py"):
        tree = ast.parse(path.read_text())
        derived = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                   and _derives(n, LITSERVE_BASES) and path != ADAPTER]  # its names: ours
        names |= _defined(tree) - (set().union(*(_members(c) for c in derived)) & _shadowable())
    return names


def test_only_the_adapter_goes_beyond_litserves_public_api_and_lists_what_it_uses():
    litserve, common = litserve_names(), _common_member_names()
    listed = {name.rsplit(".", 1)[1] for name in PRIVATE_NAMES}
    own = _own_names()
    adapter = non_public_uses(ADAPTER, litserve, own, common)
    adapter = {n.rsplit(".", 1)[-1] for n in adapter if not n.startswith("module ")}
    assert not adapter - listed, (f"server/litserve_adapter.py uses litserve names beyond its "
                                  f"public API not listed in server/litserve_private.py: "
                                  f"{sorted(adapter - listed)}")
    elsewhere = sorted(f"{path.name}: {name}" for path in sorted(SERVER.glob("*.py"))
                       if path != ADAPTER
                       for name in non_public_uses(path, litserve, own, common))
    assert not elsewhere, (f"litserve names beyond its public API used outside "
                           f"server/litserve_adapter.py (move them into the adapter, under a "
                           f"name of our own): {elsewhere}")


def test_the_check_sees_every_form_of_non_public_use(tmp_path):
    """Imports (underscored or not), attribute reads on any object, and overrides in a derived
    class are reported; public names, common members and the server's own names are not."""
    module = tmp_path / "other.py"
    module.write_text(
        "import litserve as ls\nfrom litserve.utils import LitAPIStatus\n"
        "from litserve.loops.base import _SENTINEL_VALUE\n"
        "class API(ls.LitAPI):\n"
        "    def setup(self, device):\n        self.device = device\n"
        "    def get_batch_requests(self, *a):\n        return [], []\n"
        "def f(server, queue):\n"
        "    queue.get()\n    server.app.title = 'x'\n    server.own_thing()\n"
        "    return server.litapi_connector, server._get_request_queue('/x')\n")
    litserve = litserve_names()
    assert non_public_uses(module, litserve, {"own_thing"}, _common_member_names()) == {
        "LitAPIStatus", "_SENTINEL_VALUE", "module litserve.utils", "module litserve.loops.base",
        "get_batch_requests", "litapi_connector", "_get_request_queue"}
