"""One Markdown page per command, generated from the command line's own help, so the docs cannot drift.

``python -m trustseg.cli_docs DIR`` writes ``DIR/<command>.md`` (sub-commands as ``bench-model.md``)
and ``DIR/README.md`` (the index); a test regenerates the pages and compares them with docs/.
Each page holds the command's help text (its worked example included) and a table of its options.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from trustseg.cli import app


def commands() -> dict[str, tuple[str, Any]]:
    """``page name -> (command line, command)`` for every leaf command, in the CLI's order."""
    found: dict[str, tuple[str, Any]] = {}

    def walk(group: Any, prefix: list[str]) -> None:
        for name, command in group.commands.items():
            if hasattr(command, "commands"):  # a group (typer may vendor its own click)
                walk(command, [*prefix, name])
            else:
                found["-".join([*prefix, name])] = (" ".join(["trustseg", *prefix, name]), command)

    walk(typer.main.get_command(app), [])
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def page(line: str, command: Any) -> str:
    """The Markdown page of one command: its help (paragraphs as written) and its options table."""
    context = command.context_class(command, info_name=line)
    parts = [f"# `{line}`", "", (command.help or "").strip(), "", "```", command.get_usage(context), "```", "",
             "| option | description |", "|---|---|"]
    for param in command.params:
        record = param.get_help_record(context)
        if record is not None:
            parts.append(f"| `{_cell(record[0])}` | {_cell(record[1])} |")
    return "\n".join(parts) + "\n"


def pages() -> dict[str, str]:
    """File name -> text of every page, index included."""
    found = commands()
    index = ["# trustseg commands", "", "Generated from `trustseg --help` by `python -m trustseg.cli_docs docs`.", ""]
    index += [f"- [`{line}`]({name}.md): {(command.help or '').strip().splitlines()[0]}"
              for name, (line, command) in found.items()]
    return {"README.md": "\n".join(index) + "\n", **{f"{name}.md": page(*entry) for name, entry in found.items()}}


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in pages().items():
        (folder / name).write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs")):
        print(path)
