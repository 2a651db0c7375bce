"""``llm-manager import-config``: the original LLM-Manager's config.json -> this YAML."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from llm_manager.config import parse_text
from llm_manager.importer import ImportFailed, convert, parse_json


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.command("import-config")
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the YAML configuration here (default: standard output).",
)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT when it exists.")
def import_config(source: Path, output: Path | None, force: bool) -> None:
    """Convert the original LLM-Manager's config.json into this project's YAML.

    Everything that is not carried over, or is carried over with a change worth knowing,
    is listed on standard error (and in the YAML's opening comments). Exit 1 when SOURCE
    cannot be read or is not a JSON object.
    """
    if output is not None:
        if output.exists() and not force:
            _fail(f"{output} already exists; use --force to overwrite it")
        if not output.resolve().parent.is_dir():
            _fail(f"cannot write {output}: folder {output.resolve().parent} does not exist")
    try:
        raw = source.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {source}: {exc.strerror or exc}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        _fail(f"{source} is not UTF-8 text (byte {exc.start}); convert it to UTF-8 first")
    try:
        data, duplicates = parse_json(text)
        yaml_text, report = convert(data, str(source))
    except ImportFailed as exc:
        _fail(f"{source}: {exc}")
    for item in [*duplicates, *report]:
        click.echo(str(item), err=True)
    config = parse_text(yaml_text, str(output or "<converted>"))
    if output is None:
        click.echo(yaml_text, nl=False)
    else:
        try:
            output.write_text(yaml_text, encoding="utf-8")
        except OSError as exc:
            _fail(f"cannot write {output}: {exc.strerror or exc}")
    dropped = sum(1 for item in [*duplicates, *report] if item.dropped)
    notes = len(report) - sum(1 for item in report if item.dropped)
    where = f"wrote {output}" if output is not None else "converted"
    click.echo(
        f"{where}: {len(config.models)} model(s); "
        f"{dropped} item(s) not carried over, {notes} note(s)",
        err=True,
    )
    relative = any(
        scheme.script is not None and not Path(scheme.script.replace("\\", "/")).is_absolute()
        for model in config.models.values()
        for scheme in model.schemes.values()
    )
    if output is None or not relative:
        return
    target_dir = output.resolve().parent
    if target_dir != source.resolve().parent:
        click.echo(
            f"note: relative script paths are resolved against {target_dir} (the YAML "
            f"file's directory), not {source.resolve().parent} as the original did",
            err=True,
        )
