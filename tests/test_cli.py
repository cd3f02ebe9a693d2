"""Every shipped command line refuses an abbreviated option (argparse's prefix matching off)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("train", "model", "runtime", "export", "server", "bench", "deploy", "scripts")


def parsers_allowing_abbreviations() -> list[str]:
    """`file:line` of every ArgumentParser(...) / add_parser(...) without allow_abbrev=False."""
    found = []
    for path in sorted(p for d in SOURCES for p in (REPO / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            func = getattr(node, "func", None)
            name = getattr(func, "attr", getattr(func, "id", None))
            if isinstance(node, ast.Call) and name in ("ArgumentParser", "add_parser"):
                off = [k for k in node.keywords if k.arg == "allow_abbrev"
                       and isinstance(k.value, ast.Constant) and k.value.value is False]
                if not off:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_command_line_accepts_an_abbreviated_option(tmp_path, capsys):
    from export.__main__ import build_parser as export_parser
    from server.settings import parse_settings
    from train.__main__ import main as train_main
    from radiomaps.__main__ import main as data_main
    assert parsers_allowing_abbreviations() == []
    never = str(tmp_path / "never")  # should an abbreviation pass, nothing trains or writes
    cases = [(train_main, ["--cfg", never, "--resum"], "--resum"),
             (train_main, ["eval", "--ckpt", "x.pt", "--spl", "test"], "--spl"),
             (train_main, ["report", "run", "--ou", "r.html"], "--ou"),
             (train_main, ["latent-stats", "--ckpt", "x.pt", "--se", "1"], "--se"),
             (data_main, ["synth", "--out", never, "--maps", "1", "--se", "3"], "--se"),
             (export_parser().parse_args, ["--ck", "x.pt"], "--ck"),
             (lambda argv: parse_settings(argv, environ={}), ["--max-batch", "4"], "--max-batch")]
    for call, argv, bad in cases:
        with pytest.raises(SystemExit) as stop:
            call(argv)
        assert stop.value.code == 2, argv
        assert f"unrecognized arguments: {bad}" in capsys.readouterr().err, argv
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for argv, bad in ((["train", "--cfg", "none.yaml", "--resum"], "--resum"),
                      (["export", "--ck", "x.pt", "--ou", "out"], "--ck")):
        done = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"unrecognized arguments: {bad}" in done.stderr, done
    assert list(tmp_path.iterdir()) == []  # nothing ran
