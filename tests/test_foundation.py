"""The package foundation: layout, import direction and the embedded model."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# server -> models -> kernels: a package may import only those to its right.
ALLOWED = {"server": {"models", "kernels"}, "models": {"kernels"}, "kernels": set()}


def _first_party_imports(path: Path) -> set[str]:
    """The leanserve packages a file imports; a bare `server`, `models` or `kernels` counts as itself,
    so that an import that skips the namespace is an offender too."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    found = set()
    for module in modules:
        parts = module.split(".")
        if parts[0] in ALLOWED:
            found.add(f"bare {parts[0]}")
        elif parts[0] == "leanserve" and len(parts) > 1:
            found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package):
    offenders = {
        str(path.relative_to(ROOT)): bad
        for path in (ROOT / package).rglob("*.py")
        if (bad := _first_party_imports(path) - ALLOWED[package] - {package})
    }
    assert not offenders, f"imports against server -> models -> kernels: {offenders}"


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_tests_and_benchmarks_import_through_the_namespace(folder):
    offenders = {
        str(path.relative_to(ROOT)): bad
        for path in (ROOT / folder).rglob("*.py")
        if (bad := {name for name in _first_party_imports(path) if name.startswith("bare ")})
    }
    assert not offenders, offenders


def test_package_folders_are_not_regular_top_level_packages():
    # Without __init__.py a folder on the current directory's path is at most a namespace portion, so a
    # regular package of the same name (Hugging Face's `kernels`, imported by transformers) wins.
    for name in ALLOWED:
        assert not (ROOT / name / "__init__.py").exists(), name


def test_layout_exists():
    for name in ("server", "models", "kernels", "tests", "docker", "benchmarks", "docs", ".ci"):
        assert (ROOT / name).is_dir(), name
    for name in ("Dockerfile", "pyproject.toml", "README.md", ".ci/run"):
        assert (ROOT / name).is_file(), name


def test_default_model_converted_to_plain_hf_dir(default_model_path):
    config = json.loads((default_model_path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert "quantization_config" not in config
    assert list(default_model_path.glob("*.safetensors"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in quick_start.splitlines() if line.startswith("scripts/")]
    assert commands == ["scripts/serve.sh", "scripts/test.sh"]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def _module_graph() -> dict[str, set[str]]:
    """leanserve module -> the leanserve modules it imports anywhere (type-only imports included)."""
    names = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names[".".join(("leanserve", *parts)).removesuffix(".__init__")] = path
    graph = {}
    for name, path in names.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = (imported & names.keys()) - {name}
    return graph


def test_no_import_cycles():
    graph = _module_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            assert state.get(imported) != "open", " -> ".join([*path, module, imported])
            if imported not in state:
                visit(imported, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
