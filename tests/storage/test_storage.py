"""The storage layer's seams: one SQL dialect on both databases, named and bounded
PostgreSQL connections, and view rows that go through the database unchanged."""

from __future__ import annotations

import pytest

from app.config import Settings
from app.projections.rows import ChatRow, MessageRow, message_dict
from app.storage import postgres
from app.storage.database import open_database
from app.storage.users import UserStore


def test_one_dialect_reads_and_writes_rows_by_name(settings: Settings) -> None:
    db = open_database(settings)
    try:
        chat = ChatRow("c1", "alice", "a title", "t0", "t1", None, message_count=2)
        message = MessageRow("c1", 3, "assistant", "hel", "t1", response_id="r1",
                             status="complete", usage={"total_tokens": 5},
                             tool_calls=[{"call_id": "x", "tool": "calculator"}],
                             parts=["lo"])
        with db.write() as tx:
            names = ", ".join(ChatRow.COLUMNS)
            marks = ", ".join("?" for _ in ChatRow.COLUMNS)
            tx.run(f"INSERT INTO view_chats ({names}) VALUES ({marks})", chat.to_row())
            names = ", ".join(MessageRow.COLUMNS)
            marks = ", ".join("?" for _ in MessageRow.COLUMNS)
            tx.run(f"INSERT INTO view_messages ({names}) VALUES ({marks})", message.to_row())
        with db.read() as tx:
            found = tx.one(f"{ChatRow.SELECT} WHERE chat_id = ?", ("c1",))
            stored = tx.one(f"{MessageRow.SELECT} WHERE chat_id = ? AND seq = ?", ("c1", 3))
            assert tx.value("SELECT COUNT(*) FROM view_messages") == 1
        assert found is not None and ChatRow.from_row(found) == chat
        assert stored is not None and MessageRow.from_row(stored) == message.stored()
        assert message_dict(MessageRow.from_row(stored))["content"] == "hello"
    finally:
        db.close()


def test_the_user_store_speaks_the_same_dialect(settings: Settings) -> None:
    users = UserStore(settings)
    token = users.add_user("carol")
    assert users.authenticate(token) == "carol"
    assert users.count() == 1 and users.revoke("carol") == 1 and users.count() == 0


@pytest.mark.postgres
def test_a_dedicated_connection_is_named_bounded_and_in_its_schema(
    pg_url: str, pg_schema: str
) -> None:
    settings = Settings(database_url=pg_url, database_schema=pg_schema, store_timeout_s=3.0)
    with postgres.connect(settings, "probe", search_path=True) as conn:
        name, timeout, path = conn.execute(
            "SELECT current_setting('application_name'), current_setting('statement_timeout'),"
            " current_schemas(false)").fetchone() or ("", "", [])
        assert conn.autocommit
    assert name == f"eventchat-probe:{pg_schema}"
    assert timeout == "6s"  # two store timeouts
    assert path == [pg_schema]
    assert postgres.application_name("probe") == "eventchat-probe"


@pytest.mark.postgres
def test_the_leases_connection_has_no_statement_timeout_but_keeps_its_other_bounds(
    pg_url: str, pg_schema: str
) -> None:
    settings = Settings(database_url=pg_url, database_schema=pg_schema, store_timeout_s=3.0)
    with postgres.connect(settings, "leases", statement_timeout=False) as conn:
        name, timeout = conn.execute(
            "SELECT current_setting('application_name'), current_setting('statement_timeout')"
        ).fetchone() or ("", "")
        keepalive = conn.info.get_parameters().get("keepalives_idle")
    assert (name, timeout) == (f"eventchat-leases:{pg_schema}", "0")  # 0: no limit
    assert keepalive == "3"
