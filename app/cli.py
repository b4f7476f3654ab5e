"""The eventchat command: serve, users, replay, export, projections, chat, bench.

Settings come from flags, then the environment, then defaults (``Settings.from_env``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import trio

from .config import Settings, SettingsError
from .events.errors import EventsError
from .projections.errors import ProjectionError

if TYPE_CHECKING:
    from .web.users import UserStore


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The benchmarks parse their own options (argparse.REMAINDER would drop leading flags).
        _run_bench(argv[1:])
        return
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", True) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env(
            data_dir=getattr(args, "data_dir", None),
            database_url=getattr(args, "database_url", None),
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
        )
    except SettingsError as exc:
        parser.exit(2, f"eventchat: {exc}\n")
    try:
        args.run(settings, args)
    except* KeyboardInterrupt:
        pass
    except* (EventsError, ProjectionError) as group:
        parser.exit(1, f"eventchat: {_first(group)}\n")


def _first(group: BaseExceptionGroup[Exception]) -> BaseException:
    """The first error of a group (nurseries wrap what they raise)."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventchat", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--data-dir", type=Path, help="embedded store directory (./data)")
        sub.add_argument("--database-url", help="postgresql://... (else SQLite in the data dir)")
        sub.set_defaults(run=run)
        return sub

    serve = command("serve", _serve, "serve HTTP and WebSocket")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)

    users = command("users", _users, "add a user's token, list tokens, revoke them")
    users.add_argument("action", choices=["add", "list", "revoke"])
    users.add_argument("name", nargs="?", help="the user (add, revoke)")
    users.add_argument("--id", dest="token_id", help="revoke only this token (see users list)")

    replay = command("replay", _replay, "print a chat's event log and its state at any seq")
    replay.add_argument("chat_id", type=UUID)
    replay.add_argument("--until-seq", type=int, help="stop at this event and show the chat then")
    replay.add_argument("--json", action="store_true", help="one JSON record a line")

    export = command("export", _export, "export event logs as JSON Lines")
    export.add_argument("chat_id", type=UUID, nargs="?", help="one chat (default: every chat)")

    projections = command("projections", _projections, "rebuild the views or show their lag")
    projections.add_argument("action", choices=["rebuild", "status"])

    chat = command("chat", _chat, "talk to a running server from the terminal")
    chat.add_argument("--url", default="ws://127.0.0.1:8000/ws/chat")
    chat.add_argument("--token", required=True)
    chat.add_argument("--chat-id")

    bench = command("bench", _bench, "measure eventchat against a direct model call")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    return parser


def _serve(settings: Settings, args: argparse.Namespace) -> None:
    from .web.errors import CoreTaskFailedError
    from .web.server import serve

    store = (
        f"PostgreSQL ({_redact(settings.database_url)})"
        if settings.database_url
        else (f"SQLite in {settings.data_dir.resolve()}")
    )
    model = settings.model or ("offline" if settings.provider == "offline" else "provider default")
    upstream = f" at {settings.openai_base_url}" if settings.openai_base_url else ""
    logging.getLogger("eventchat").info(
        "store: %s; model: %s via %s%s", store, model, settings.provider, upstream
    )
    _preflight(settings)
    try:
        trio.run(partial(serve, settings, freeze_startup_objects=True))
    except* CoreTaskFailedError as group:  # for the supervisor to start the process again
        sys.exit(f"eventchat: {_first(group)}; exiting")


def _preflight(settings: Settings) -> None:
    """Fails early, in one line, when the store cannot be used (before anything listens)."""
    from .actors.system import claim_data_dir
    from .events.store import EventStore

    if settings.store_kind == "sqlite":
        claim_data_dir(settings.data_dir).close()
    EventStore.open(settings).close()


def _users(settings: Settings, args: argparse.Namespace) -> None:
    from .web.users import UserStore

    users = UserStore(settings)
    if args.action == "list":
        _list_tokens(users)
        return
    if not args.name:
        sys.exit(f"eventchat: users {args.action} needs a NAME")
    if args.action == "add":
        try:
            token = users.add_user(args.name)
        except ValueError as exc:
            sys.exit(f"eventchat: {exc}")
        print(f"Created user {args.name!r}. Bearer token:")
        print(token)
    else:
        _revoke(users, args.name, args.token_id)


def _list_tokens(users: UserStore) -> None:
    tokens = users.tokens()
    if not tokens:
        print("no users")
        return
    width = max(len("NAME"), *(len(t.name) for t in tokens))
    print(f"{'NAME':<{width}}  ID        CREATED (UTC)")
    for t in tokens:
        print(f"{t.name:<{width}}  {t.token_id}  {t.created_at}")


def _revoke(users: UserStore, name: str, token_id: str | None) -> None:
    from .web.users import TOKEN_CACHE_S

    try:
        count = users.revoke(name, token_id)
    except ValueError as exc:
        sys.exit(f"eventchat: {exc}")
    if not count:
        which = f"token {token_id} of user" if token_id else "token of user"
        sys.exit(f"eventchat: no {which} {name!r}")
    print(f"Revoked {count} token{'s' * (count > 1)} of user {name!r}; running servers refuse"
          f" {'them' if count > 1 else 'it'} within {TOKEN_CACHE_S:g} s (WebSocket connections"
          " already open stay open until they close).")


def _open_app(settings: Settings) -> Any:
    from .events.application import ChatApplication, persistence_env

    return ChatApplication(
        env=persistence_env(settings), snapshot_interval=settings.snapshot_interval
    )


def _replay(settings: Settings, args: argparse.Namespace) -> None:
    from .events.errors import ChatNotFoundError
    from .events.replay import chat_at, chat_records, describe

    app = _open_app(settings)
    try:
        for record in chat_records(app, args.chat_id, until_seq=args.until_seq):
            print(json.dumps(record) if args.json else describe(record))
    except ChatNotFoundError as exc:
        sys.exit(f"eventchat: {exc}")
    if not args.json:
        chat = chat_at(app, args.chat_id, args.until_seq)
        print(f"\nchat {chat.id} at seq {chat.version}: {chat.title!r} (owner {chat.owner})")
        for message in chat.history:
            print(f"  [{message['seq']}] {message['role']}: {message['content']}")
        if chat.current is not None:
            print(f"  [streaming {chat.current.response_id}] assistant: {chat.current.text}")
        if chat.pending:
            print(f"  waiting for an answer: seq {', '.join(map(str, chat.pending))}")


def _export(settings: Settings, args: argparse.Namespace) -> None:
    from .events.replay import all_chat_ids, chat_records

    app = _open_app(settings)
    chat_ids = [args.chat_id] if args.chat_id else all_chat_ids(app)
    for chat_id in chat_ids:
        for record in chat_records(app, chat_id):
            print(json.dumps({"chat_id": str(chat_id), **record}))


def _projections(settings: Settings, args: argparse.Namespace) -> None:
    from .projections import rebuild, status

    if args.action == "rebuild":
        count = rebuild(settings, progress=True)
        print(f"rebuilt every view from {count} events")
    else:
        print(json.dumps(status(settings), indent=2))


def _chat(settings: Settings, args: argparse.Namespace) -> None:
    from .terminal import run_terminal_chat

    trio.run(run_terminal_chat, args.url, args.token, args.chat_id)


def _bench(settings: Settings, args: argparse.Namespace) -> None:
    _run_bench(list(args.rest))


def _run_bench(rest: list[str]) -> None:
    if rest[:1] == ["projections"]:
        from .projections.bench import main as projections_bench

        projections_bench(rest[1:])
        return
    from .bench import main as bench_main

    bench_main(rest)


def _redact(url: str | None) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url or "")
    host = parts.hostname or ""
    return f"{parts.scheme}://{parts.username or ''}@{host}:{parts.port or 5432}{parts.path}"


if __name__ == "__main__":
    main()
