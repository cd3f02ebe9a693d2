"""The docs say what the code does: every `python -m` command line in README.md and docs/*.md
names a module that exists and only options its CLI accepts, every repository path they name
exists, and every `make` target they name is in the Makefile. Run before each stop (it is part
of `make test`); the cheap commands themselves run in tests/test_newcomer.py and
tests/test_cli.py."""
from __future__ import annotations

import functools
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} | {"examples"}
COMMAND = re.compile(r"python3? -m ((?:%s)(?:\.\w+)*)((?: +[^\s|;&#`)]+)*)" % "|".join(PACKAGES))
PATH = re.compile(r"`((?:%s|scripts|deploy|configs|docs|tests)/[\w./*-]+)`" % "|".join(PACKAGES))
MAKE = re.compile(r"`make ([a-z][\w-]*)")


def _text(doc: Path) -> str:
    """The document with shell line continuations joined."""
    return re.sub(r"\\\n\s*", " ", doc.read_text())


def documented_commands() -> list[tuple[str, str, tuple[str, ...], str]]:
    """(module, subcommand or "", long options, where) of every `python -m` line."""
    found = []
    for doc in DOCS:
        for number, line in enumerate(_text(doc).splitlines(), 1):
            for match in COMMAND.finditer(line):
                words = match.group(2).split()
                if "--" in words:  # a wrapper's command (bench.load -- python -m ...)
                    words = words[:words.index("--")]
                sub = words[0] if words and re.fullmatch(r"[a-z][a-z-]+", words[0]) else ""
                options = tuple(sorted({w.split("=")[0] for w in words if w.startswith("--")}))
                found.append((match.group(1), sub, options, f"{doc.name}:{number}"))
    return found


@functools.cache
def help_text(module: str, sub: str) -> str:
    """What `python -m module [sub] --help` prints ("" with its error when it fails)."""
    args = [sys.executable, "-m", module, *([sub] if sub else []), "--help"]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    return run.stdout if run.returncode == 0 else f"FAILED: {run.stderr[-300:]}"


def _subcommand(module: str, sub: str) -> str:
    """`sub` when the module's help lists it as a subcommand, else "" (a positional value)."""
    return sub if sub and re.search(rf"\b{re.escape(sub)}\b", help_text(module, "")) else ""


def test_every_documented_command_exists_and_takes_its_options():
    commands = documented_commands()
    assert len(commands) > 50, "the scan found too few commands: is the pattern broken?"
    keys = {(m, s) for m, s, _, _ in commands}
    with ThreadPoolExecutor(4) as pool:  # a help is mostly the import of torch
        list(pool.map(lambda k: help_text(k[0], ""), keys))
        list(pool.map(lambda k: help_text(k[0], _subcommand(*k)), keys))
    wrong = []
    for module, sub, options, where in commands:
        text = help_text(module, _subcommand(module, sub))
        if text.startswith("FAILED"):
            wrong.append(f"{where}: python -m {module} {sub}: {text}")
            continue
        wrong += [f"{where}: python -m {module} {sub}: no option {o}" for o in options
                  if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
    assert not wrong, "\n".join(wrong)


def test_every_documented_path_exists():
    missing = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for match in PATH.finditer(line):
                path = match.group(1).rstrip(".")
                if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                    missing.append(f"{doc.name}:{number}: {path}")
    assert not missing, "\n".join(missing)


def test_every_documented_make_target_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    missing = [f"{doc.name}: make {t}" for doc in DOCS for t in MAKE.findall(doc.read_text())
               if t not in targets]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("line, expected", [
    ("$ python -m train eval --ckpt reference --split test  # x",
     ("train", "eval", ("--ckpt", "--split"))),
    ("python -m bench.load -- python -m train --cfg quickstart.yaml", ("bench.load", "", ())),
    ("`python -m export --ckpt X --out D --format=onnx`", ("export", "", ("--ckpt", "--format",
                                                                         "--out"))),
])
def test_the_scan_reads_commands_as_written(line, expected, tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text(line + "\n")
    monkeypatch.setattr(f"{__name__}.DOCS", [doc])
    assert documented_commands()[0][:3] == expected
