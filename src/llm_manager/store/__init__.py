"""SQLite persistence: one writer thread, WAL, batched commits, numbered migrations."""
