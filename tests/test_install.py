"""A fresh install works beside Hugging Face's `kernels` package, which transformers imports: the
distribution installs one import name, `leanserve`, and both the copied install (scripts/serve.sh, the
container) and the editable one (scripts/test.sh) serve the default model, started from the repository
root where the `kernels/` folder sits on the import path."""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import openai
import pytest
from http_server import wait_until

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_imports_hf_kernels_beside_ours():
    import transformers.activations  # noqa: F401  (imports `kernels` since transformers 5.25)

    from leanserve.kernels import lean_attention

    kernels = importlib.import_module("kernels")  # Hugging Face's, by the name transformers uses
    assert hasattr(kernels, "CUDAProperties"), kernels.__file__
    assert Path(kernels.__file__).resolve().parent != ROOT / "kernels"
    assert Path(lean_attention.__file__).resolve().parent == ROOT / "kernels"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", out]
    subprocess.run([*pip, ROOT], check=True, capture_output=True)
    (built,) = out.glob("leanserve-*.whl")
    return built


def test_distribution_installs_only_the_leanserve_name(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (dist_info,) = {name.split("/")[0] for name in names if ".dist-info/" in name}
        top_level = archive.read(f"{dist_info}/top_level.txt").decode().split()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert top_level == ["leanserve"]
    assert {name.split("/")[0] for name in names} == {"leanserve", dist_info}
    assert {name.split("/")[1] for name in names if name.startswith("leanserve/")} == {
        "kernels",
        "models",
        "server",
    }
    assert "leanserve = leanserve.server.api.cli:main" in entry_points


def _copied_install(wheel: Path, venv: Path) -> Path:
    """A virtual environment holding a copy of leanserve, which takes every other package from this
    environment (a path entry; this environment's editable leanserve is a .pth hook and stays out)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel]
    subprocess.run(install, check=True, capture_output=True)
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("install", ["copied", "editable"])
def test_install_serves_the_default_model_from_the_repository_root(
    install, wheel, tmp_path, default_model_path
):
    python = _copied_install(wheel, tmp_path / "venv") if install == "copied" else Path(sys.executable)
    imported = subprocess.run(
        [
            python,
            "-c",
            "import transformers.activations, leanserve.kernels.lean_attention as k; print(k.__file__)",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert (ROOT in Path(imported.strip()).parents) == (install == "editable"), imported

    port = _free_port()
    argv = [python, "-m", "leanserve.server", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(argv, cwd=ROOT, env=os.environ, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(ready, timeout=240), (tmp_path / "server.log").read_text()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        stream = client.chat.completions.create(
            model=default_model_path.name,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip()
        assert 0 < chunks[-1].usage.completion_tokens <= 8
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
