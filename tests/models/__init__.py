"""Tiny random-weight GGUF models written on the fly for tests (no downloads)."""
