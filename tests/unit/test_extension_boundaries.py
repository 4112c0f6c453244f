"""Extensions use ctx.llm only: no provider SDK import anywhere under metering/extensions/."""

from __future__ import annotations

import ast
from pathlib import Path

import metering.extensions

FORBIDDEN = ("anthropic", "openai", "metering.llm.providers", "httpx", "requests")
EXTENSIONS_DIR = Path(metering.extensions.__file__).parent


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names.extend(str(arg.value) for arg in node.args if isinstance(arg, ast.Constant))
    return names


def test_scan_finds_the_bundled_sources() -> None:
    files = list(EXTENSIONS_DIR.rglob("*.py"))
    assert any(f.name == "handlers.py" for f in files)


def test_no_extension_imports_a_provider_sdk() -> None:
    offenders = [
        f"{path.relative_to(EXTENSIONS_DIR)}: {name}"
        for path in EXTENSIONS_DIR.rglob("*.py")
        for name in _imports(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    ]
    assert offenders == []


def test_the_scan_would_catch_an_offender(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import anthropic\nfrom openai import AsyncOpenAI\n")
    assert _imports(bad) == ["anthropic", "openai"]
