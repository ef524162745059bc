"""The static checks of `make lint`, run as part of the suite so CI enforces them."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """gen/ must be exactly what protos/generate.py makes from protos/ now."""
    result = run(sys.executable, "protos/generate.py", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(REPO / "gen")
        for p in (REPO / "gen").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == committed, "gen/ has extra or missing files: run `make proto`"
    stale = [
        str(p) for p in fresh if not filecmp.cmp(tmp_path / p, REPO / "gen" / p, shallow=False)
    ]
    assert stale == [], f"stale generated files (run `make proto`): {stale}"


@pytest.mark.parametrize(
    "command",
    [
        ("ruff", "check", "."),
        ("ruff", "format", "--check", "."),
        ("mypy",),
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_python_static_checks(command: tuple[str, ...]) -> None:
    result = run(str(BIN / command[0]), *command[1:])
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint() -> None:
    result = run(str(BIN / "buf"), "lint", cwd=REPO / "protos")
    assert result.returncode == 0, result.stdout + result.stderr


def test_squawk_migrations() -> None:
    result = run(sys.executable, "-m", "db.squawk")
    assert result.returncode == 0, result.stdout + result.stderr
