"""The CLI's options as typer builds them from the tables (request fields, run flags)."""

from __future__ import annotations

import typer

from wan_spmd.cli import RUN_OPTIONS, app
from wan_spmd.params import FIELDS


def test_every_option_of_every_command_has_its_help():
    """If this fails, an option lost its help text or its kind (a string annotation that typer
    cannot read turns `--output-dir` into a positional argument, as happened once)."""
    group = typer.main.get_command(app)
    for name in ("generate", "batch", "serve"):
        command = group.commands[name]
        options = {p.name: p for p in command.params}
        missing = [p.name for p in command.params if not getattr(p, "help", None)]
        assert missing == [], (name, missing)
        assert {n for n, _, _ in RUN_OPTIONS} <= set(options), name
    generate = {p.name: p for p in group.commands["generate"].params}
    assert {f.name for f in FIELDS} <= set(generate)
    assert group.commands["batch"].params[1].name == "output_dir"
    assert isinstance(group.commands["batch"].params[1], typer.core.TyperOption)
