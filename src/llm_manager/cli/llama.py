"""``llm-manager llama-server``: the bundled llama.cpp engine as a CLI command."""

from __future__ import annotations

import sys

import click


@click.command(
    "llama-server",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def llama_server(args: tuple[str, ...]) -> None:
    """Serve a GGUF model with the bundled llama.cpp (llama-server flags; see --help)."""
    from llm_manager.engines.llama_server import main

    sys.exit(main(list(args)))
