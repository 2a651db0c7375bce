"""Ordered, numbered schema migrations. Append only: never edit a released step."""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            method TEXT NOT NULL,
            status INTEGER NOT NULL,
            stream INTEGER NOT NULL DEFAULT 0,
            started_at REAL NOT NULL,
            ended_at REAL NOT NULL,
            duration_ms REAL NOT NULL,
            ttfb_ms REAL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            cache_n INTEGER,
            prompt_n INTEGER,
            predicted_n INTEGER,
            error TEXT
        );
        CREATE INDEX requests_started ON requests (started_at);
        CREATE INDEX requests_model_started ON requests (model, started_at);
        """,
    ),
    (
        2,
        """
        CREATE TABLE log_lines (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            ts REAL NOT NULL,
            stream TEXT NOT NULL,
            message TEXT NOT NULL
        );
        CREATE INDEX log_lines_model_id ON log_lines (model, id);
        CREATE INDEX log_lines_ts ON log_lines (ts);
        """,
    ),
    (
        3,
        """
        CREATE TABLE footprints (
            model TEXT NOT NULL,
            scheme TEXT NOT NULL,
            device TEXT NOT NULL,
            definition TEXT NOT NULL,
            load_peak_mib INTEGER,
            serve_peak_mib INTEGER,
            runs INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL,
            PRIMARY KEY (model, scheme, device)
        );
        """,
    ),
]
