"""Model server engines bundled with LLM-Manager."""
