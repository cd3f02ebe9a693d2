"""The layers: model <- runtime <- radiomaps <- {train, export, server} <- {bench, examples}.

Every arrow is a test of its own, named in its id ("export-must-not-import-train"): each
package imports only packages of the layers below its own, so model imports no first-party
package, runtime only model, radiomaps only model and runtime, train, export and server only
those three and none of each other, bench and examples anything below them (deploy/'s health
probe stands with them); so no package imports bench, examples or tests (the test suite
imports what it tests); and every first-party package a shipped package imports is shipped."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# top-level folders of Python files or of packages (tests/ and examples/ are namespace
# packages: no __init__.py)
FIRST_PARTY = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
               and (any(p.glob("*.py")) or any(p.glob("*/__init__.py")))}
# The layers, lowest first: a package may import the packages of the layers below its own.
LAYERS = [("model",), ("runtime",), ("radiomaps",), ("train", "export", "server"),
          ("bench", "examples", "deploy")]


def below(package: str) -> set[str]:
    """The packages of the layers under `package`'s."""
    level = next(i for i, layer in enumerate(LAYERS) if package in layer)
    return {name for layer in LAYERS[:level] for name in layer}


def imported_packages(package: str) -> dict[str, set[str]]:
    """Other top-level first-party packages imported by each .py file of `package`, imports
    inside functions included. A relative import cannot leave its top-level package."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
        found[path.relative_to(ROOT).as_posix()] = names & FIRST_PARTY - {package}
    return found


ARROWS = [(package, other) for layer in LAYERS for package in layer
          for other in sorted({p for p in FIRST_PARTY | {"tests"} if p != package}
                              - below(package))]


@pytest.mark.parametrize("package, other", ARROWS,
                         ids=[f"{p}-must-not-import-{o}" for p, o in ARROWS])
def test_package_imports_only_the_layers_below_it(package, other):
    files = imported_packages(package)
    assert files, f"no .py files under {package}/"
    wrong = sorted(f for f, names in files.items() if other in names)
    allowed = sorted(below(package)) or "no first-party package"
    assert not wrong, f"{package}/ may import only {allowed}; these files import {other}/: {wrong}"


def test_every_folder_of_python_files_has_a_layer():
    """A new top-level package must be given a layer (or be tests/): its arrows are checked."""
    placed = {name for layer in LAYERS for name in layer} | {"tests"}
    assert FIRST_PARTY - placed == set(), "add these to LAYERS"


def test_the_layers_are_used():
    """The arrows are not vacuous: each layer's packages build on the one below where stated."""
    uses = {p: set().union(*imported_packages(p).values()) for p in FIRST_PARTY}
    assert uses["model"] == set()
    assert uses["runtime"] == {"model"}
    assert uses["radiomaps"] == {"model", "runtime"}
    for package in ("train", "export"):
        assert {"model", "runtime", "radiomaps"} <= uses[package], package
    assert {"model", "runtime"} <= uses["server"]


def test_every_imported_package_is_shipped():
    """A package left out of [tool.setuptools] packages is missing from the wheel and the
    Docker image, where `python -m server` then fails at import."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {p.split(".")[0] for p in setuptools["packages"]}
    for package in sorted(shipped):
        for f, names in imported_packages(package).items():
            assert names <= shipped, f"{f} imports {sorted(names - shipped)}, not in packages"


def test_the_scan_sees_every_import_form(tmp_path, monkeypatch):
    """The checker itself: `import a.b`, `from a.b import c` and a function-local import are
    reported; relative imports and third-party packages are not."""
    for name in ("model", "server", "runtime", "train"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "model" / "a.py").write_text(
        "import torch\nimport server.app\nfrom .blocks import AttnBlock\n"
        "def f():\n    from runtime.inference import prepare_for_inference\n")
    (tmp_path / "model" / "b.py").write_text("from train.trainer import x as y, z\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    monkeypatch.setattr(f"{__name__}.FIRST_PARTY", {"model", "server", "runtime", "train"})
    assert imported_packages("model") == {"model/__init__.py": set(),
                                          "model/a.py": {"server", "runtime"},
                                          "model/b.py": {"train"}}
