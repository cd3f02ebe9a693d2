"""The docs say what the code does: every `python -m` command line in README.md and docs/*.md
names a module that exists and only options its CLI accepts, every repository path they name
exists, and every `make` target they name is in the Makefile. Run before each stop (it is part
of `make test`); the cheap commands themselves run in tests/test_newcomer.py and
tests/test_cli.py."""
from __future__ import annotations

import json
import re
import subprocess
import sys
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


# Runs `python -m MODULE [SUB] --help` for each (module, sub) of argv[1] (JSON) the way
# `python -m` does (runpy, as __main__), all in one interpreter: the import of torch, most of
# each help's cost, is paid once, not once per command. Prints {"module sub": help or FAILED}.
HELP_DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
texts = {}
for module, sub in json.loads(sys.argv[1]):
    sys.argv = [module, *([sub] if sub else []), "--help"]
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code
    except BaseException:
        code = 1
        err.write(traceback.format_exc())
    texts[f"{module} {sub}"] = (out.getvalue() if code in (0, None)
                                else f"FAILED: {err.getvalue()[-300:]}")
print(json.dumps(texts))
"""


def help_texts(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """What `python -m module [sub] --help` prints for each (module, sub) ("" sub: the module's
    own help), or "FAILED: " and its error; one fresh interpreter runs them all."""
    run = subprocess.run([sys.executable, "-c", HELP_DRIVER, json.dumps(keys)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    texts = json.loads(run.stdout.strip().splitlines()[-1])
    return {(module, sub): texts[f"{module} {sub}"] for module, sub in keys}


def _subcommand(module: str, sub: str, own_help: str) -> str:
    """`sub` when the module's help lists it as a subcommand, else "" (a positional value)."""
    return sub if sub and re.search(rf"\b{re.escape(sub)}\b", own_help) else ""


def test_every_documented_command_exists_and_takes_its_options():
    commands = documented_commands()
    assert len(commands) > 50, "the scan found too few commands: is the pattern broken?"
    modules = sorted({(m, "") for m, _, _, _ in commands})
    texts = help_texts(modules)
    subs = {(m, s): _subcommand(m, s, texts[m, ""]) for m, s, _, _ in commands}
    texts.update(help_texts(sorted({(m, sub) for (m, _), sub in subs.items()} - set(texts))))
    wrong = []
    for module, sub, options, where in commands:
        text = texts[module, subs[module, sub]]
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
