"""``eventchat audit verify`` and ``eventchat audit checkpoint`` (docs/audit.md).

Both first link the chats of a store written before the audit chain (``link_unlinked``).
``verify`` walks the chats in chat-id order (a page of ids at a time, each chat a page of
events at a time, with a progress bar on stderr), prints one line per broken chat
(``CHAT_ID: first invalid seq N (reason)``) and returns the exit status: 0 and a summary
line when every chain holds, 1 otherwise.

A checkpoint is JSON Lines, its chats in chat-id order, signed with HMAC-SHA256 under
``EVENTCHAT_AUDIT_KEY``: a header line, one line per chat ``{"chat_id", "seq", "hash"}``
(its head), and a last line ``{"chats", "signature"}`` whose signature covers every byte
before it. ``verify --checkpoint`` checks the signature before it trusts a line, and reads the
file as it walks the chats (never all of it at once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from uuid import UUID

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from .config import Settings
from .events import audit
from .events.application import ChatApplication
from .events.audit import AuditError
from .storage.recorder import persistence_env

FORMAT = 1
ALGORITHM = "HMAC-SHA256"


@dataclass(frozen=True, slots=True)
class Head:
    chat_id: UUID
    seq: int
    hash: bytes


def verify(settings: Settings, chat_ids: list[UUID], checkpoint: Path | None) -> int:
    """Checks the chats (every chat when ``chat_ids`` is empty), against ``checkpoint``'s
    heads too if given; prints what it finds and returns the exit status."""
    key = _key(settings) if checkpoint is not None else b""
    if checkpoint is not None:
        _check_signature(checkpoint, key)
    with _opened(settings) as app:
        _link_old_chats(app)
        only = set(chat_ids) or None
        ids = iter(sorted(only)) if only else audit.chat_ids(app)
        heads = _heads_in(checkpoint) if checkpoint is not None else iter(())
        total = len(only) if only else audit.count_chats(app)
        checked, broken = 0, 0
        with _progress(total) as advance:
            for chat_id, head in _paired(ids, heads, only):
                verdict = audit.verify_chat(app, chat_id)
                if head is not None:
                    verdict = audit.against_checkpoint(app, verdict, chat_id, head.seq,
                                                       head.hash)
                elif verdict is None:
                    raise AuditError(f"no chat {chat_id} in this store")
                checked += 1
                advance()
                if not verdict.valid:
                    broken += 1
                    print(f"{chat_id}: first invalid seq {verdict.first_invalid_seq} "
                          f"({verdict.reason})", flush=True)
    against = f" against the checkpoint {checkpoint}" if checkpoint is not None else ""
    if broken:
        print(f"eventchat: {broken} of {checked} chats do not verify{against}", file=sys.stderr)
        return 1
    print(f"verified {checked} chat{'s' * (checked != 1)}{against}: every chain holds")
    return 0


def write_checkpoint(settings: Settings, out: Path | None) -> None:
    """Writes the head of every chat, signed, to ``out`` (atomically) or to stdout."""
    key = _key(settings)
    with _opened(settings) as app:
        _link_old_chats(app)
        if out is None:
            count = _write_heads(app, key, sys.stdout)
            return
        partial = out.with_name(out.name + ".partial")
        with partial.open("w", encoding="utf-8") as file:
            count = _write_heads(app, key, file)
            file.flush()
            os.fsync(file.fileno())
        partial.replace(out)
    print(f"checkpoint of {count} chat{'s' * (count != 1)} written to {out}", file=sys.stderr)


def _write_heads(app: ChatApplication, key: bytes, file: IO[str]) -> int:
    mac = hmac.new(key, digestmod=hashlib.sha256)

    def line(obj: dict[str, object]) -> None:
        text = json.dumps(obj, separators=(",", ":")) + "\n"
        mac.update(text.encode("utf-8"))
        file.write(text)

    line({"eventchat_checkpoint": FORMAT, "algorithm": ALGORITHM,
          "created_at": datetime.now(UTC).isoformat(timespec="seconds")})
    count = 0
    for chat_id in audit.chat_ids(app):
        seq, digest = audit.head(app, chat_id)
        if seq:
            line({"chat_id": str(chat_id), "seq": seq, "hash": digest.hex()})
            count += 1
    file.write(json.dumps({"chats": count, "signature": mac.hexdigest()}) + "\n")
    return count


def _check_signature(path: Path, key: bytes) -> None:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    last = None
    try:
        with path.open("rb") as file:
            for raw in file:
                if last is not None:
                    mac.update(last)
                last = raw
    except OSError as exc:
        raise AuditError(f"cannot read the checkpoint {path}: {exc.strerror or exc}") from exc
    try:
        signature = json.loads(last or b"{}").get("signature")
    except (json.JSONDecodeError, AttributeError):
        signature = None
    if not isinstance(signature, str) or not hmac.compare_digest(signature, mac.hexdigest()):
        raise AuditError(f"the checkpoint {path} is not signed with this EVENTCHAT_AUDIT_KEY "
                         "(a wrong key, or the file was changed)")


def _heads_in(path: Path) -> Iterator[Head]:
    """The heads of a checkpoint whose signature was checked, in chat-id order."""
    with path.open("rb") as file:
        previous = None
        for raw in file:
            obj = json.loads(raw)
            if "chat_id" not in obj:
                continue
            head = Head(UUID(obj["chat_id"]), int(obj["seq"]), bytes.fromhex(obj["hash"]))
            if previous is not None and head.chat_id <= previous:
                raise AuditError(f"the checkpoint {path} is not in chat-id order")
            previous = head.chat_id
            yield head


def _paired(ids: Iterator[UUID], heads: Iterator[Head], only: set[UUID] | None
            ) -> Iterator[tuple[UUID, Head | None]]:
    """Merges the store's chats and the checkpoint's heads, both in chat-id order (with
    ``only``, just those chats)."""
    head = next(heads, None)
    for chat_id in ids:
        while head is not None and head.chat_id < chat_id:
            if only is None:
                yield head.chat_id, head
            head = next(heads, None)
        if head is not None and head.chat_id == chat_id:
            yield chat_id, head
            head = next(heads, None)
        else:
            yield chat_id, None
    while head is not None:
        if only is None:
            yield head.chat_id, head
        head = next(heads, None)


def _key(settings: Settings) -> bytes:
    if not settings.audit_key:
        raise AuditError("EVENTCHAT_AUDIT_KEY is not set: checkpoints are signed with it")
    return settings.audit_key.encode("utf-8")


def _link_old_chats(app: ChatApplication) -> None:
    linked = audit.link_unlinked(app)
    if linked:
        print(f"linked {linked} chat{'s' * (linked != 1)} written before the audit chain, "
              "from their first event", file=sys.stderr)


@contextmanager
def _opened(settings: Settings) -> Iterator[ChatApplication]:
    app = ChatApplication(env=persistence_env(settings),
                          snapshot_interval=settings.snapshot_interval)
    try:
        yield app
    finally:
        app.close()


@contextmanager
def _progress(total: int) -> Iterator[Any]:
    console = Console(stderr=True)
    with Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("chats", total=total)
        yield lambda: bar.advance(task)
