"""Ollama API facade: Ollama's /api/* translated to the models' OpenAI endpoints and back."""
