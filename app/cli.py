"""The eventchat command: serve, users, replay, export, audit, projections, chat, bench.

Settings come from flags, then the environment, then the configuration file (``--config``,
``EVENTCHAT_CONFIG``), then defaults (``Settings.from_env``).
Every failure is one line on stderr and an exit code: 2 for what was asked wrongly (a bad
setting, a data dir that does not exist), 1 for what went wrong (a busy port, an
unreachable store, a server in the way); ``--debug`` shows the traceback of an error that
has no message of its own. Modules are imported by the command that needs them, so that
``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import trio

from .config import Settings, SettingsError
from .events.errors import EventsError

if TYPE_CHECKING:
    from .storage.users import UserStore

#: The files of a SQLite data dir: one of them shows that a directory is one.
STORE_FILES = ("events.sqlite", "views.sqlite", "users.sqlite")


class CommandError(Exception):
    """A command cannot do what was asked: one line, and ``code`` as the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The benchmarks parse their own options (argparse.REMAINDER would drop leading flags).
        _run(argparse.ArgumentParser(prog="eventchat bench"), _run_bench, argv[1:],
             debug=False)
        return
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", True) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env(
            config_file=getattr(args, "config", None),
            data_dir=getattr(args, "data_dir", None),
            database_url=getattr(args, "database_url", None),
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
        )
    except SettingsError as exc:
        parser.exit(2, f"eventchat: {exc}\n")
    _run(parser, partial(args.run, settings), args, debug=args.debug)


def _run(parser: argparse.ArgumentParser, run: Any, args: Any, debug: bool) -> None:
    """Runs a command; any error ends it with one line and an exit status."""
    try:
        run(args)
    except* KeyboardInterrupt:
        pass
    except* Exception as group:
        error = _first(group)
        if debug and _message(error) is None:
            raise
        parser.exit(*_exit(error))


def _exit(error: BaseException) -> tuple[int, str]:
    """The exit status and the one line that say what went wrong."""
    message = _message(error)
    if message is None:
        message = (f"unexpected error: {type(error).__name__}: {_first_line(error)} "
                   "(--debug shows the traceback)")
    code = error.code if isinstance(error, CommandError) else 1
    return code, f"eventchat: {message}\n"


def _message(error: BaseException) -> str | None:
    """The one-line message of an error the commands expect, else None."""
    from .storage.errors import StorageError

    if isinstance(error, CommandError | EventsError | StorageError | SettingsError):
        return str(error)
    if isinstance(error, OSError):
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror or error}{where}"
    if type(error).__module__.startswith(("psycopg", "eventsourcing.persistence")):
        return f"the store failed: {_first_line(error)}"  # (modules imported only if used)
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
        sub.add_argument("--config", type=Path, metavar="FILE",
                         help="TOML configuration file: models, MCP servers, tools that need "
                              "approval, budgets (EVENTCHAT_CONFIG)")
        sub.add_argument("--data-dir", type=Path,
                         help="directory of the SQLite store (EVENTCHAT_DATA_DIR, ./data)")
        sub.add_argument("--database-url",
                         help="postgresql://... to use PostgreSQL instead of SQLite "
                              "(EVENTCHAT_DATABASE_URL)")
        sub.add_argument("--debug", action="store_true",
                         help="show the traceback of an unexpected error")
        sub.set_defaults(run=run)
        return sub

    serve = command("serve", _serve, "serve HTTP and WebSocket")
    serve.add_argument("--host", help="address to listen on (EVENTCHAT_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (EVENTCHAT_PORT, 8000)")

    users = command("users", _users, "add a user's token, list tokens, revoke them")
    users.add_argument("action", choices=["add", "list", "revoke"],
                       help="add NAME: a new token, printed alone on the last line; list: every "
                            "token; revoke NAME: delete its tokens")
    users.add_argument("name", nargs="?", help="the user (add, revoke)")
    users.add_argument("--id", dest="token_id", help="revoke only this token (see users list)")

    replay = command("replay", _replay, "print a chat's event log and its state at any seq")
    replay.add_argument("chat_id", type=UUID, help="the chat's id")
    replay.add_argument("--until-seq", type=int, metavar="N",
                        help="stop at event N and show the chat as it was then (0: before it "
                             "existed)")
    replay.add_argument("--json", action="store_true", help="one JSON record a line")
    replay.add_argument("--live", action="store_true",
                        help="print the chat as it streamed, with its original pacing")
    replay.add_argument("--speed", type=float, default=1.0, metavar="S",
                        help="--live: S times the original pace (0: at once; default 1)")

    export = command("export", _export, "export event logs as JSON Lines")
    export.add_argument("chat_id", type=UUID, nargs="?", help="one chat (default: every chat)")
    export.add_argument("--format", default="jsonl",
                        help="jsonl (default): the event log with each event's audit hash and "
                             "stored bytes; openai: {\"messages\": [...]} in the OpenAI chat "
                             "format, one chat a line; markdown: a readable transcript")

    audit = command("audit", _audit, "verify the chats' audit chains, or sign their heads")
    audit.add_argument("action", choices=["verify", "checkpoint"],
                       help="verify [CHAT_ID ...]: check every chain (or these chats'); "
                            "checkpoint: write every chat's head, signed with "
                            "EVENTCHAT_AUDIT_KEY")
    audit.add_argument("chat_ids", type=UUID, nargs="*", metavar="CHAT_ID",
                       help="the chats to verify (default: every chat)")
    audit.add_argument("--checkpoint", type=Path, metavar="FILE",
                       help="verify: also check the chains against this signed checkpoint "
                            "(finds a cut or rewritten tail)")
    audit.add_argument("--out", type=Path, metavar="FILE",
                       help="checkpoint: write it to FILE (default: stdout)")

    projections = command("projections", _projections, "rebuild the views or show their lag")
    projections.add_argument("action", choices=["rebuild", "status"],
                             help="rebuild: drop the views and apply the whole log again (the "
                                  "servers must be stopped); status: position, log end, lag")

    purge = command("purge", _purge, "after deleting chats: make the database files drop "
                                     "the deleted rows' bytes (docs/operations.md)")
    purge.add_argument("--full", action="store_true",
                       help="PostgreSQL: VACUUM FULL (rewrites each table; locks it meanwhile)")

    chat = command("chat", _chat, "talk to a running server from the terminal")
    chat.add_argument("--url", default="ws://127.0.0.1:8000/ws/chat",
                      help="the server's WebSocket (default %(default)s); http://HOST:PORT "
                           "works too")
    chat.add_argument("--token", help="your bearer token (eventchat users add NAME prints one)")
    chat.add_argument("--chat-id", help="continue this chat: its history is shown first")

    # listed for --help only: ``main`` hands ``bench`` to the benchmarks before parsing
    commands.add_parser("bench", help="measure eventchat against a direct model call "
                                      "(eventchat bench --help)")
    return parser


def _serve(settings: Settings, args: argparse.Namespace) -> None:
    from .web.errors import CoreTaskFailedError
    from .web.server import serve

    _preflight(settings)
    store = (
        f"PostgreSQL ({_redact(settings.database_url)})"
        if settings.database_url
        else (f"SQLite in {settings.data_dir.resolve()}")
    )
    upstreams = "; ".join(
        f"{', '.join(u.models)} via {u.name}" + (f" at {u.base_url}" if u.base_url else "")
        for u in settings.catalog()
    )
    logging.getLogger("eventchat").info(
        "store: %s; default model: %s; models: %s", store, settings.default_model, upstreams
    )
    try:
        trio.run(partial(serve, settings, freeze_startup_objects=True))
    except* CoreTaskFailedError as group:  # for the supervisor to start the process again
        sys.exit(f"eventchat: {_first(group)}; exiting")


def _preflight(settings: Settings) -> None:
    """Fails early, in one line, when the port is taken or the store cannot be used: before
    anything is created (the data dir, the first user) and before anything listens."""
    from .actors.system import claim_data_dir
    from .events.store import EventStore

    _check_bind(settings.host, settings.port, "--port")
    if settings.metrics_bind:
        host, _, port = settings.metrics_bind.rpartition(":")
        _check_bind(host.strip("[]"), int(port), "EVENTCHAT_METRICS_BIND")
    if settings.store_kind == "sqlite":
        claim_data_dir(settings.data_dir).close()
    EventStore.open(settings).close()


def _check_bind(host: str, port: int, option: str) -> None:
    """Binds ``host:port`` as Hypercorn will (``SO_REUSEADDR``), and lets it go at once."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            raise CommandError(f"cannot listen on {host}: unknown address ({exc.strerror})",
                               2) from None
        except OSError as exc:
            hint = {errno.EADDRINUSE: f" (another server? {option} chooses another)",
                    errno.EACCES: " (ports below 1024 need privileges)"}.get(exc.errno or 0, "")
            raise CommandError(f"cannot listen on {host}:{port}: "
                               f"{(exc.strerror or str(exc)).lower()}{hint}") from None


def _existing_data_dir(settings: Settings) -> None:
    """Read commands use an existing store: a mistyped ``--data-dir`` must not create an
    empty one (exit status 2)."""
    if settings.store_kind != "sqlite":
        return
    data_dir = settings.data_dir
    if not data_dir.is_dir():
        raise CommandError(f"no data dir {data_dir} (--data-dir or EVENTCHAT_DATA_DIR names "
                           "the directory eventchat serve uses)", 2)
    if not any((data_dir / name).exists() for name in STORE_FILES):
        raise CommandError(f"{data_dir} is not an eventchat data dir (it holds none of "
                           f"{', '.join(STORE_FILES)})", 2)


def _users(settings: Settings, args: argparse.Namespace) -> None:
    from .storage.users import UserStore

    if args.action != "add":
        _existing_data_dir(settings)
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
    from .events.application import ChatApplication
    from .storage.recorder import persistence_env

    return ChatApplication(
        env=persistence_env(settings), snapshot_interval=settings.snapshot_interval
    )


def _replay(settings: Settings, args: argparse.Namespace) -> None:
    from .events.replay import chat_at, chat_events, chat_records, describe

    if args.until_seq is not None and args.until_seq < 0:
        raise CommandError("--until-seq counts events: 0 or more", 2)
    if not 0 <= args.speed <= 1000:
        raise CommandError("--speed is between 0 (at once) and 1000", 2)
    _existing_data_dir(settings)
    app = _open_app(settings)
    if args.until_seq == 0:
        chat_records(app, args.chat_id, limit=1)  # the chat exists (else: no chat)
        if not args.json:
            print(f"chat {args.chat_id} at seq 0: not created yet (its first event, seq 1, "
                  "creates it)")
        return
    if args.live:
        from .replay_cli import replay_live

        replay_live(chat_events(app, args.chat_id, args.until_seq), args.speed)
        return
    for record in chat_records(app, args.chat_id, until_seq=args.until_seq):
        print(json.dumps(record) if args.json else describe(record))
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
    from .events.errors import ChatDeletedError
    from .events.export import FORMATS
    from .events.replay import all_chat_ids

    if args.format not in FORMATS:
        raise CommandError(f"unknown --format {args.format!r} (one of {', '.join(FORMATS)})", 2)
    _existing_data_dir(settings)
    app = _open_app(settings)
    chat_ids = [args.chat_id] if args.chat_id else all_chat_ids(app)
    for chat_id in chat_ids:
        try:  # a chat's events are read before any of its lines is written
            for chunk in FORMATS[args.format].render(app, chat_id):
                sys.stdout.write(chunk)
        except ChatDeletedError:
            if args.chat_id:
                raise  # (every chat: the deleted ones are passed over)


def _audit(settings: Settings, args: argparse.Namespace) -> None:
    from . import audit_cli

    _existing_data_dir(settings)
    if args.action == "checkpoint":
        if args.chat_ids or args.checkpoint:
            raise CommandError("audit checkpoint takes no CHAT_ID and no --checkpoint", 2)
        audit_cli.write_checkpoint(settings, args.out)
        return
    if args.out:
        raise CommandError("--out is for audit checkpoint", 2)
    code = audit_cli.verify(settings, args.chat_ids, args.checkpoint)
    if code:
        sys.exit(code)


def _projections(settings: Settings, args: argparse.Namespace) -> None:
    from .projections import rebuild, status

    _existing_data_dir(settings)
    if args.action == "rebuild":
        with _no_running_server(settings):
            count = rebuild(settings, progress=True)
        print(f"rebuilt every view from {count} events")
    else:
        print(json.dumps(status(settings), indent=2))


def _purge(settings: Settings, args: argparse.Namespace) -> None:
    from .storage.purge import purge

    _existing_data_dir(settings)
    purge(settings, full=args.full, say=print)


@contextmanager
def _no_running_server(settings: Settings) -> Iterator[None]:
    """Refuses to go on while a server uses the store (it would keep projecting into the
    views being rebuilt). SQLite: takes the data dir's lock, held until the end, so that no
    server starts meanwhile. PostgreSQL: looks for the servers' LISTEN connections."""
    from .actors.system import DataDirLockedError, claim_data_dir

    if settings.store_kind == "postgres":
        servers = _listening_servers(settings)
        if servers:
            raise CommandError(f"{servers} eventchat server{'s' * (servers > 1)} use"
                               f"{'s' * (servers == 1)} this database (schema "
                               f"{settings.database_schema}): stop them before rebuilding")
        yield
        return
    try:
        lock = claim_data_dir(settings.data_dir)
    except DataDirLockedError:
        raise CommandError(f"a server is using {settings.data_dir}: stop it before rebuilding "
                           "the views") from None
    try:
        yield
    finally:
        lock.close()


def _listening_servers(settings: Settings) -> int:
    """How many ``eventchat serve`` processes listen for this schema's live channel
    (0 when that cannot be told: the rebuild then reports the store's own errors)."""
    import psycopg
    from psycopg import sql

    from .actors.cluster import Bus
    from .actors.connections import LISTEN
    from .storage.postgres import application_name, connect

    channel = Bus(settings, lambda item: None).channel
    try:
        with connect(settings, "cli") as conn:
            listen = sql.SQL("LISTEN {}").format(sql.Identifier(channel)).as_string(conn)
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                "AND datname = current_database() AND query = %s",
                (application_name(LISTEN, settings.database_schema), listen)).fetchone()
    except psycopg.Error:
        return 0
    return int(row[0]) if row else 0


def _chat(settings: Settings, args: argparse.Namespace) -> None:
    from .terminal import run_terminal_chat

    code = trio.run(run_terminal_chat, args.url, args.token, args.chat_id)
    if code:
        sys.exit(code)


def _run_bench(rest: list[str]) -> None:
    from .bench import main as bench_main
    from .bench import projections_main

    if rest[:1] == ["projections"]:
        projections_main(rest[1:])
        return
    if rest[:1] == ["keys"]:
        from .bench.keys import main as keys_main

        keys_main(rest[1:])
        return
    bench_main(rest)


def _redact(url: str | None) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url or "")
    host = parts.hostname or ""
    return f"{parts.scheme}://{parts.username or ''}@{host}:{parts.port or 5432}{parts.path}"


if __name__ == "__main__":
    main()
