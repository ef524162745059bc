"""The static checks of `make lint`, run as part of the suite so CI enforces them."""

from __future__ import annotations

import filecmp
import shutil
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


# The released API (`make release-protos`): protos/ may only change compatibly
# against it (the FILE rules of protos/buf.yaml). Imports (google.protobuf) are
# not ours and are not compared.
RELEASED_PROTOS = REPO / "protos" / "released" / "chat.binpb"


def buf_breaking(protos: Path) -> subprocess.CompletedProcess[str]:
    return run(
        str(BIN / "buf"),
        "breaking",
        str(protos),
        "--against",
        str(RELEASED_PROTOS),
        "--exclude-imports",
    )


def test_buf_breaking_against_the_released_api() -> None:
    result = buf_breaking(REPO / "protos")
    assert result.returncode == 0, (
        "protos/ breaks the released API (protos/released/): add a new package "
        "version instead (README, 'Changing the API')\n" + result.stdout + result.stderr
    )


# Edits of a copy of protos/: (file, text, replacement, breaking?).
_USER_EMAIL = "  string email = 2;\n"
_API_EDITS = {
    "unchanged": ("chat/v1/users.proto", _USER_EMAIL, _USER_EMAIL, False),
    "field-added": (
        "chat/v1/users.proto",
        _USER_EMAIL,
        _USER_EMAIL + "  string nickname = 99;\n",
        False,
    ),
    "field-removed": ("chat/v1/users.proto", _USER_EMAIL, "", True),
    "field-renumbered": ("chat/v1/users.proto", _USER_EMAIL, "  string email = 20;\n", True),
}


@pytest.mark.parametrize("edit", list(_API_EDITS))
def test_buf_breaking_fails_on_a_removed_or_renumbered_field(edit: str, tmp_path: Path) -> None:
    """The check above can fail: the same command on an edited copy of protos/."""
    name, text, replacement, breaking = _API_EDITS[edit]
    copy = tmp_path / "protos"
    shutil.copytree(REPO / "protos", copy, ignore=shutil.ignore_patterns("released"))
    source = (copy / name).read_text()
    assert source.count(text) == 1, f"{name} no longer has {text!r}: pick another field"
    (copy / name).write_text(source.replace(text, replacement))
    result = buf_breaking(copy)
    output = result.stdout + result.stderr
    if breaking:
        assert result.returncode != 0, output
        assert 'Previously present field "2" with name "email"' in output, output
    else:
        assert result.returncode == 0, output


def test_squawk_migrations() -> None:
    result = run(sys.executable, "-m", "db.squawk")
    assert result.returncode == 0, result.stdout + result.stderr
