"""The audit chain on both stores: written with the events, and every kind of tampering with
the stored rows found at its exact seq by ``eventchat audit verify`` (run in-process), a cut
or rewritten tail by ``verify --checkpoint``, and a store written before the chain linked on
start."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from uuid import UUID

import pytest
import trio

from app.audit_cli import verify, write_checkpoint
from app.config import Settings
from app.events import audit
from app.events.store import EventStore
from app.storage.chain import GENESIS, canonical, link

from .tamper import EVENTS, EXPECTED, Tamper, open_app, tampered_store, two_turn_chat

KEY = "a checkpoint key"


def test_a_link_is_sha256_of_the_previous_link_and_the_canonical_event() -> None:
    chat_id = UUID("3fa85f64-5717-4562-b3fc-2c963f66afa6")
    form = canonical(chat_id, 7, "t:T", b"\x00{}")
    assert form == (b"\x00\x00\x00\x24" + str(chat_id).encode() + (7).to_bytes(8, "big")
                    + b"\x00\x00\x00\x03t:T" + b"\x00\x00\x00\x03\x00{}")
    assert link(GENESIS, chat_id, 7, "t:T", b"\x00{}") == hashlib.sha256(
        bytes(32) + form).digest()


async def test_links_are_written_with_the_events(settings: Settings) -> None:
    app = await trio.to_thread.run_sync(open_app, settings)
    try:
        chat_id = await trio.to_thread.run_sync(two_turn_chat, app)
        verdict = await trio.to_thread.run_sync(audit.verify_chat, app, chat_id)
    finally:
        app.close()
    links = Tamper(settings).links()
    assert [v for _, v, _ in links] == list(range(1, EVENTS + 1))
    assert verdict is not None and verdict.valid and verdict.head_seq == EVENTS
    assert verdict.head_hash == links[-1][2]


async def test_verify_names_the_first_invalid_seq_and_why(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    chats = await trio.to_thread.run_sync(tampered_store, settings)
    code = await trio.to_thread.run_sync(verify, settings, [], None)
    out = capsys.readouterr()
    assert code == 1
    expected = {f"{chats[name]}: first invalid seq {seq} ({reason})"
                for name, (seq, reason) in EXPECTED.items()}
    assert set(out.out.splitlines()) == expected
    assert "4 of 5 chats do not verify" in out.err

    code = await trio.to_thread.run_sync(verify, settings, [chats["intact"]], None)
    assert code == 0 and capsys.readouterr().out == "verified 1 chat: every chain holds\n"
    code = await trio.to_thread.run_sync(verify, settings, [chats["reordered"]], None)
    assert code == 1
    assert capsys.readouterr().out == f"{chats['reordered']}: first invalid seq 4 (reordered)\n"


async def test_a_checkpoint_finds_a_cut_tail_and_a_rewritten_tail(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = await trio.to_thread.run_sync(open_app, settings)
    try:
        cut, rewritten, kept = [await trio.to_thread.run_sync(two_turn_chat, app)
                                for _ in range(3)]
    finally:
        app.close()
    signed = settings.replace(audit_key=KEY)
    checkpoint = tmp_path / "heads.jsonl"
    await trio.to_thread.run_sync(write_checkpoint, signed, checkpoint)
    assert f'"chat_id":"{kept}","seq":{EVENTS}' in checkpoint.read_text()

    tamper = Tamper(settings)
    tamper.cut_events(cut, 7)
    tamper.cut_chain(cut, 7)  # a careful cut: the chain alone still holds
    tamper.rewrite_last(rewritten, EVENTS)
    assert await trio.to_thread.run_sync(verify, signed, [], None) == 0
    assert "verified 3 chats: every chain holds" in capsys.readouterr().out

    assert await trio.to_thread.run_sync(verify, signed, [], checkpoint) == 1
    assert set(capsys.readouterr().out.splitlines()) == {
        f"{cut}: first invalid seq 7 (truncated)",
        f"{rewritten}: first invalid seq {EVENTS} (modified)"}
    assert await trio.to_thread.run_sync(verify, signed, [kept], checkpoint) == 0

    # the checkpoint's signature is checked before any of its lines is trusted
    with pytest.raises(audit.AuditError, match="not signed with this EVENTCHAT_AUDIT_KEY"):
        verify(settings.replace(audit_key="another key"), [], checkpoint)
    forged = tmp_path / "forged.jsonl"
    forged.write_text(checkpoint.read_text().replace(f'"seq":{EVENTS}', '"seq":6', 1))
    with pytest.raises(audit.AuditError, match="not signed"):
        verify(signed, [], forged)
    with pytest.raises(audit.AuditError, match="^EVENTCHAT_AUDIT_KEY is not set"):
        write_checkpoint(settings, tmp_path / "unsigned.jsonl")
    assert not (tmp_path / "unsigned.jsonl").exists()


async def test_a_store_written_before_the_chain_is_linked_on_start(settings: Settings) -> None:
    app = await trio.to_thread.run_sync(open_app, settings)
    try:
        chats = [await trio.to_thread.run_sync(two_turn_chat, app) for _ in range(3)]
    finally:
        app.close()
    tamper = Tamper(settings)
    linked_first = tamper.links()
    tamper.drop_chain()

    # two processes start at once on the old store (on SQLite: two openings of it)
    stores: list[EventStore] = []
    threads = [threading.Thread(target=lambda: stores.append(EventStore.open(settings)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert len(stores) == 2
        assert tamper.links() == linked_first  # the same links, each written once
        verdicts = [audit.verify_chat(stores[0].app, chat_id) for chat_id in chats]
        assert all(v is not None and v.valid and v.head_seq == EVENTS for v in verdicts)
        # and writing goes on from the linked head
        chat = await stores[0].get(chats[0])
        chat.receive_message("later", "c-later")
        await stores[0].save(chat)
        verdict = audit.verify_chat(stores[0].app, chats[0])
        assert verdict is not None and verdict.valid and verdict.head_seq == EVENTS + 1
    finally:
        for store in stores:
            store.close()
