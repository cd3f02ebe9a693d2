"""scripts/install.sh: which torch build `make install` asks pip for."""
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"


def _dry_run(index: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PY": sys.executable, "TORCH_CPU_INDEX": index}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], env=env,
                          capture_output=True, text=True, timeout=30)


def test_a_reachable_cpu_index_is_used_for_torch(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<html></html>")
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = f"http://127.0.0.1:{server.server_address[1]}/"
        out = _dry_run(index)
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr
    assert "the CPU build" in out.stdout
    torch_cmd, project_cmd = out.stdout.strip().splitlines()[-2:]
    assert torch_cmd.endswith(f"pip install -q torch==2.13.0 --extra-index-url {index}")
    assert project_cmd.endswith(f"pip install -q -e .[cpu,dev] --extra-index-url {index}")


def test_an_unreachable_cpu_index_says_what_pip_will_take():
    out = _dry_run("http://127.0.0.1:9/")  # the discard port: connection refused
    assert out.returncode == 0, out.stderr
    assert "not reachable" in out.stdout and "CUDA build" in out.stdout
    torch_cmd, project_cmd = out.stdout.strip().splitlines()[-2:]
    assert torch_cmd.endswith("pip install -q torch==2.13.0")
    assert project_cmd.endswith("pip install -q -e .[cpu,dev]")


def test_gpu_and_unknown_options():
    assert "CUDA build" in _dry_run("http://127.0.0.1:9/", "--gpu").stdout
    bad = _dry_run("http://127.0.0.1:9/", "--cpu")
    assert bad.returncode == 2 and "unknown option --cpu" in bad.stderr
