from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.common.errors import InvalidArgument
from services.common.pagination import (
    MAX_PAGE_SIZE,
    decode_page_token,
    encode_page_token,
    page_size_of,
)
from services.common.settings import ServiceSettings


def test_pool_defaults_are_the_spec_pool_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DB_POOL_MAX_SIZE", "DB_POOL_IDLE_TIMEOUT", "DB_CONNECT_TIMEOUT", "GRPC_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = ServiceSettings()
    assert settings.pool_max_size == 20
    assert settings.pool_idle_timeout_s == 30.0
    assert settings.connect_timeout_s == 2.0
    assert [settings.port_for(s) for s in ("users", "threads", "messages")] == [50051, 50052, 50053]


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("GRPC_PORT", "6000")
    monkeypatch.setenv("DB_POOL_MAX_SIZE", "5")
    monkeypatch.setenv("AUTH_TOKENS", " a ,b,, ")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = ServiceSettings()
    assert settings.require_url() == "postgresql://u@h/db"
    assert settings.port_for("messages") == 6000
    assert settings.pool_max_size == 5
    assert settings.token_list() == ["a", "b"]
    assert settings.log_level == "DEBUG"


def test_page_size_defaults_and_clamps() -> None:
    assert page_size_of(0) == 50
    assert page_size_of(7) == 7
    assert page_size_of(MAX_PAGE_SIZE) == MAX_PAGE_SIZE
    assert page_size_of(MAX_PAGE_SIZE + 1) == MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument):
        page_size_of(-1)


def test_page_tokens_round_trip_and_refuse_misuse() -> None:
    token = encode_page_token("threads", {"user": "u1"}, ["2026-01-01T00:00:00Z", "id-9"])
    assert decode_page_token(token, "threads", {"user": "u1"}) == ["2026-01-01T00:00:00Z", "id-9"]
    assert decode_page_token("", "threads", {"user": "u1"}) is None
    for bad_token, kind, params in [
        (token, "threads", {"user": "u2"}),  # same token, other request parameters
        (token, "messages", {"user": "u1"}),  # another method's token
        ("not-a-token!", "threads", {"user": "u1"}),
        (token[:-3], "threads", {"user": "u1"}),  # truncated
    ]:
        with pytest.raises(InvalidArgument) as caught:
            decode_page_token(bad_token, kind, params)
        assert caught.value.violations[0].field == "page_token"


def _bounded_fields() -> list[tuple[type[Any], str, str, float, float]]:
    """(model, alias, kind, bound, step) for every numeric setting with a bound."""
    from annotated_types import Ge, Gt, Le, Lt

    from services.messages.settings import MessagesSettings
    from services.threads.typing_limit import TypingSettings

    found = []
    for model in (ServiceSettings, MessagesSettings, TypingSettings):
        for field in model.model_fields.values():
            step = 1 if field.annotation is int else 0.001
            for bound in field.metadata:
                for kind, cls in (("ge", Ge), ("gt", Gt), ("le", Le), ("lt", Lt)):
                    if isinstance(bound, cls) and field.alias:
                        found.append((model, field.alias, kind, getattr(bound, kind), step))
    return found


@pytest.mark.parametrize(
    ("model", "alias", "kind", "bound", "step"),
    _bounded_fields(),
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_every_bounded_setting_refuses_a_value_past_its_bound(
    model: type[Any], alias: str, kind: str, bound: float, step: float
) -> None:
    """Every limit is explicit: one step past each bound is refused with the
    setting named, and the bound itself (where inclusive) is accepted."""
    outside = bound - step if kind in ("ge", "gt") else bound + step
    if kind in ("gt", "lt"):
        outside = bound
    base = {"DATABASE_URL": "postgresql://x@127.0.0.1/x"} if model is ServiceSettings else {}
    with pytest.raises(ValidationError) as caught:
        model(**base, **{alias: outside})
    assert alias in str(caught.value)
    if kind in ("ge", "le"):
        model(**base, **{alias: bound})
