"""The packages' import arrows go one way: model/ (the network) imports none of the packages
built on it; runtime/ (how the network is run fast) imports model/ but none of its users; and
every first-party package a shipped package imports is shipped too (pyproject's `packages`)."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# top-level folders of Python files (tests/ is a namespace package: it has no __init__.py)
FIRST_PARTY = {p.name for p in ROOT.iterdir()
               if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.py"))}


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


@pytest.mark.parametrize("package, forbidden", [
    ("model", {"runtime", "train", "export", "server", "bench", "tests"}),
    ("runtime", {"train", "export", "server", "bench", "tests"}),
])
def test_package_imports_none_of_its_users(package, forbidden):
    files = imported_packages(package)
    assert files, f"no .py files under {package}/"
    wrong = {f: sorted(names & forbidden) for f, names in files.items() if names & forbidden}
    assert not wrong, f"{package}/ must not import {sorted(forbidden)}: {wrong}"


def test_runtime_builds_on_model_and_serves_server_and_bench():
    assert {"model"} == set().union(*imported_packages("runtime").values())
    for user in ("server", "bench"):
        assert "runtime" in set().union(*imported_packages(user).values()), user


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
    (tmp_path / "model" / "b.py").write_text("from train.data import x as y, z\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    monkeypatch.setattr(f"{__name__}.FIRST_PARTY", {"model", "server", "runtime", "train"})
    assert imported_packages("model") == {"model/__init__.py": set(),
                                          "model/a.py": {"server", "runtime"},
                                          "model/b.py": {"train"}}
