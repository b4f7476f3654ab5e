"""The database connections of every store, and the one SQL dialect of eventchat's tables.

    recorder    the event store's persistence: ``persistence_env(settings)`` for the
                ``eventsourcing`` library, the fenced PostgreSQL recorder, deadlines
    database    the views' database (``open_database``): SQLite or PostgreSQL, through ``Tx``
    users       the users and their token hashes (``UserStore``)
    postgres    how PostgreSQL is reached: pools and dedicated connections (``connect``),
                each bounded and named; the schema-creation lock
    sql         ``Tx``: ``?`` placeholders and unqualified names on both dialects
    tables      the views' DDL
    errors      ``StorageError`` and the views' errors

SQLite keeps each store in a file of the data directory (``events.sqlite``,
``views.sqlite``, ``users.sqlite``); PostgreSQL keeps them all in one schema. Everything
here is blocking: the async layers run it in worker threads.
"""
