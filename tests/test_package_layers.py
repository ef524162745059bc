"""No package cycles: who may import whom, read from the source with `ast`.

- The shared runtime (services/common) never imports the `db` tool package,
  which imports the runtime.
- Product and tool code (services/, db/, bench/, devtools/) never imports tests/.
- No service imports another service (they share services/common only).
- The benchmark measures through gRPC, the product's public functions or its
  own SQL: it never imports a service's store.
- The client package (chat_client) is what other teams install to call the
  services: it depends on the API (the generated `chat.v1`) only, never on the
  services, the db tool, the tools or the tests.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("users", "threads", "messages")


def imports_of(path: Path) -> Iterator[str]:
    """Every module `path` imports, absolute (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).rstrip(".")
            yield base
            # `from services import users` imports services.users
            yield from (f"{base}.{alias.name}" for alias in node.names)


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def offending(folders: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(REPO)} imports {module}"
        for path in sources(*folders)
        for module in imports_of(path)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]


def test_the_shared_runtime_never_imports_the_db_tool() -> None:
    assert offending(("services/common",), ("db",)) == []


def test_product_and_tools_never_import_tests() -> None:
    assert offending(("services", "db", "chat_client", "bench", "devtools"), ("tests",)) == []


def test_the_client_package_depends_on_the_api_only() -> None:
    assert sources("chat_client"), "chat_client has no sources: the check would pass vacuously"
    forbidden = ("services", "db", "tests", "bench", "devtools")
    assert offending(("chat_client",), forbidden) == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    others = tuple(f"services.{other}" for other in SERVICES if other != service)
    assert offending((f"services/{service}",), others) == []


def test_the_shared_runtime_imports_no_service() -> None:
    services = tuple(f"services.{name}" for name in SERVICES)
    assert offending(("services/common",), services) == []


def test_the_benchmark_uses_no_store() -> None:
    stores = tuple(f"services.{name}.store" for name in SERVICES)
    assert offending(("bench",), stores) == []


def test_the_check_sees_imports() -> None:
    """The parser finds what it looks for (guards against a check that passes vacuously)."""
    found = set(imports_of(REPO / "services" / "common" / "admin.py"))
    assert "services.common.database_stats" in found
