"""The error contract: every ErrorInfo.reason the services can send is a value of
chat.v1.ErrorReason (protos/chat/v1/errors.proto), with one status code each, the
one its comment there names. Read from the source: every `reason="..."` given to
an error class; and every error class's `default_reason` (its code's name unless
it names another)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from chat.v1 import errors_pb2

from services.common import errors

REPO = Path(__file__).resolve().parents[2]
PREFIX = "ERROR_REASON_"


def emitted() -> dict[str, set[str]]:
    """Each reason in the services' source -> the status codes it is raised with."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "services").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "reason" and isinstance(keyword.value, ast.Constant):
                        func = node.func
                        name = func.value if isinstance(func, ast.Attribute) else func
                        assert isinstance(name, ast.Name), ast.dump(func)
                        cls = getattr(errors, name.id, None)
                        assert cls is not None, f"{path}: reason given to {name.id}"
                        found.setdefault(str(keyword.value.value), set()).add(cls.code.name)
    for cls in error_classes(errors.DomainError):
        found.setdefault(cls.default_reason, set()).add(cls.code.name)
    return found


def error_classes(base: type[errors.DomainError]) -> list[type[errors.DomainError]]:
    below = base.__subclasses__()
    return [base, *(cls for sub in below for cls in error_classes(sub))]


def documented_codes() -> dict[str, str]:
    """Each ErrorReason (without prefix) -> the status code its comment names."""
    text = (REPO / "protos" / "chat" / "v1" / "errors.proto").read_text()
    return {
        m.group(1): m.group(2) for m in re.finditer(rf"{PREFIX}([A-Z_]+) = \d+; // ([A-Z_]+)", text)
    }


def test_every_emitted_reason_is_in_the_enum_with_its_one_code() -> None:
    reasons = emitted()
    declared = {
        name.removeprefix(PREFIX)
        for name in errors_pb2.ErrorReason.DESCRIPTOR.values_by_name
        if name != f"{PREFIX}UNSPECIFIED"
    }
    assert set(reasons) <= declared, sorted(set(reasons) - declared)
    assert declared <= set(reasons), f"listed but never sent: {sorted(declared - set(reasons))}"
    codes = documented_codes()
    assert set(codes) == declared
    for reason, raised_with in reasons.items():
        assert raised_with == {codes[reason]}, (reason, raised_with, codes[reason])


def test_the_scan_sees_reasons() -> None:
    """The scan is not vacuous: it finds the reasons of the user streams."""
    reasons = emitted()
    assert reasons["CURSOR_EXPIRED"] == {"FAILED_PRECONDITION"}
    assert reasons["USER_INACTIVE"] == {"PERMISSION_DENIED"}
    assert reasons["SHUTTING_DOWN"] == {"UNAVAILABLE"}
    assert reasons["NOT_FOUND"] == {"NOT_FOUND"}
