"""What a new user meets first: the help, the docs' snippets, the version the README claims,
what git ignores, and the progress lines long jobs print."""
from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from export.__main__ import main as export_main
from model.lpips import VGG16_FILE
from runtime.progress import Progress
from server.settings import parse_settings
from tests.test_export import write_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
PACKAGES = ("model", "runtime", "train", "export", "server", "bench", "tests", "scripts")


def python_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown.read_text(), flags=re.S)


def test_train_help_lists_every_subcommand_and_bundled_config():
    done = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for name in ("eval", "latent-stats", "latent-check", "pack", "report", "figures"):
        assert re.search(rf"^  {re.escape(name)} ", done.stdout, flags=re.M), name
    configs = re.sub(r"\s+", " ", done.stdout)
    assert "(first_radio.yaml, quickstart.yaml, reference.yaml)" in configs


def test_the_server_takes_localhost():
    settings = parse_settings(["--model", "reference", "--host", "localhost"], environ={})
    assert settings.host == "localhost"


def test_git_ignores_where_the_docs_write_but_not_the_data_package():
    ignored = subprocess.run(["git", "check-ignore", "data/RadioMapSeer/x.png",
                              "exports/first_radio/manifest.json", "radiomaps/base.py"],
                             cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == ["data/RadioMapSeer/x.png",
                                      "exports/first_radio/manifest.json"]


def _imports_tomllib(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.Import) and any(a.name == "tomllib" for a in node.names)
               or isinstance(node, ast.ImportFrom) and node.module == "tomllib"
               for node in ast.walk(tree))


def test_the_python_version_the_readme_claims_is_what_the_code_needs():
    """tomllib is 3.11's: pyproject's requires-python and the README must say 3.11."""
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert any(_imports_tomllib(p) for d in PACKAGES for p in (REPO / d).rglob("*.py"))
    assert required == ">=3.11"
    assert "Python 3.11+" in (REPO / "README.md").read_text()
    assert "3.10+" not in (REPO / "README.md").read_text()


def test_the_readme_names_the_vgg_file_and_where_it_goes():
    text = (REPO / "README.md").read_text()
    real_data = text[text.index("The RadioDiff recipe on real data"):]
    assert VGG16_FILE in real_data and "~/.cache/torch/hub/checkpoints/" in real_data


def test_progress_off_a_terminal_is_a_line_per_tenth_and_the_last():
    stream = io.StringIO()  # not a terminal
    with Progress(95, "eval test", "maps", stream=stream, period_s=1e9) as progress:
        for _ in range(19):
            progress.update(5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and all(" INFO [" in line for line in lines)
    assert "eval test: 10/95 maps (11%)" in lines[0] and "left" in lines[0]
    assert lines[-1].endswith("eval test: 95/95 maps (100%), " + lines[-1].split(", ", 1)[1])
    assert "left" not in lines[-1]


@pytest.mark.slow  # trains, exports latents and serves, as docs/ldm.md does (~11 s)
def test_ldm_md_python_snippets_run_as_written(tmp_path):
    """docs/ldm.md's snippets, each in a fresh interpreter, from a folder where the shards the
    page's own command writes are (made here from a tiny model and a small split)."""
    ckpt = write_tiny_checkpoint(tmp_path / "model-1.pt", seed=0)
    out = tmp_path / "data" / "latents" / "train"
    assert export_main(["latents", "--ckpt", str(ckpt), "--split", "train", "--out", str(out),
                        "--path", "default", "data.name=synthetic", "data.num_maps=4",
                        "data.num_tx=2", "data.image_size=[64,64]", "data.num_workers=0"]) == 0
    blocks = python_blocks(REPO / "docs" / "ldm.md")
    assert len(blocks) == 2
    for code in blocks:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{code}\n{done.stderr[-2000:]}"
