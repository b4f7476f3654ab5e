"""The views' tables: their DDL on each dialect, and the columns added since the first
version (views made before get them empty; ``eventchat projections rebuild`` fills them)."""

from __future__ import annotations

#: Name of the followed application in the tracking table.
TRACKED = "eventchat"

TABLES = ("view_tracking", "view_chats", "view_messages", "view_counters", "view_sketches",
          "view_search", "view_skipped", "view_usage")

COMMON_DDL = [
    "CREATE TABLE IF NOT EXISTS view_tracking ("
    " name TEXT PRIMARY KEY, position BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS view_chats ("
    " chat_id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL,"
    " created_at TEXT NOT NULL, updated_at TEXT NOT NULL, model TEXT,"
    " message_count INTEGER NOT NULL, prompt_tokens BIGINT NOT NULL,"
    " completion_tokens BIGINT NOT NULL, total_tokens BIGINT NOT NULL,"
    " last_message_preview TEXT, current_seq INTEGER, leaf_seq INTEGER, forked_from TEXT)",
    "CREATE INDEX IF NOT EXISTS view_chats_by_activity"
    " ON view_chats (owner, updated_at DESC, chat_id DESC)",
    "CREATE TABLE IF NOT EXISTS view_messages ("
    " chat_id TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,"
    " created_at TEXT NOT NULL, client_message_id TEXT, response_id TEXT, status TEXT,"
    " model TEXT, usage TEXT, timing TEXT, tool_calls TEXT, error TEXT, finish_reason TEXT,"
    " parent_seq INTEGER, PRIMARY KEY (chat_id, seq))",
    "CREATE TABLE IF NOT EXISTS view_counters ("
    " scope TEXT NOT NULL, name TEXT NOT NULL, value BIGINT NOT NULL,"
    " PRIMARY KEY (scope, name))",
    "CREATE TABLE IF NOT EXISTS view_sketches ("
    " scope TEXT NOT NULL, metric TEXT NOT NULL, bucket INTEGER NOT NULL,"
    " count BIGINT NOT NULL, PRIMARY KEY (scope, metric, bucket))",
    # tokens each user's responses used, per UTC day (of their ending) and requested model
    "CREATE TABLE IF NOT EXISTS view_usage ("
    " owner TEXT NOT NULL, day TEXT NOT NULL, model TEXT NOT NULL,"
    " responses BIGINT NOT NULL, prompt_tokens BIGINT NOT NULL,"
    " completion_tokens BIGINT NOT NULL, total_tokens BIGINT NOT NULL,"
    " PRIMARY KEY (owner, day, model))",
    # events the views could not take (see ``Views.apply``), kept until the next rebuild
    "CREATE TABLE IF NOT EXISTS view_skipped ("
    " position BIGINT PRIMARY KEY, chat_id TEXT NOT NULL, topic TEXT NOT NULL,"
    " error TEXT NOT NULL, skipped_at TEXT NOT NULL)",
    "INSERT INTO view_tracking (name, position) VALUES ('" + TRACKED + "', 0)"
    " ON CONFLICT (name) DO NOTHING",
]

#: Columns added since the tables' first version, as (table, column, type): views made
#: before get them empty (``eventchat projections rebuild`` fills them from the log).
ADDED_COLUMNS = (("view_messages", "finish_reason", "TEXT"),
                 ("view_messages", "parent_seq", "INTEGER"),
                 ("view_chats", "leaf_seq", "INTEGER"),
                 ("view_chats", "forked_from", "TEXT"))

SQLITE_DDL = [
    *COMMON_DDL,
    "CREATE VIRTUAL TABLE IF NOT EXISTS view_search USING fts5("
    " content, owner UNINDEXED, chat_id UNINDEXED, seq UNINDEXED, role UNINDEXED,"
    " tokenize = 'porter unicode61')",
]

POSTGRES_DDL = [
    *COMMON_DDL,
    "CREATE TABLE IF NOT EXISTS view_search ("
    " owner TEXT NOT NULL, chat_id TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT NOT NULL,"
    " content TEXT NOT NULL,"
    " tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED,"
    " PRIMARY KEY (chat_id, seq))",
    "CREATE INDEX IF NOT EXISTS view_search_tsv ON view_search USING GIN (tsv)",
]
