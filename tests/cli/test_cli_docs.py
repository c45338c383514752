"""docs/ is generated from the command line's help: a page that differs from its command fails here."""

from pathlib import Path

from trustseg.cli_docs import commands, pages

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_command_has_its_page_and_the_pages_match_the_help():
    expected = pages()
    assert {p.name for p in DOCS.glob("*.md")} == set(expected), "regenerate with: python -m trustseg.cli_docs docs"
    for name, text in expected.items():
        assert (DOCS / name).read_text(encoding="utf-8") == text, (
            f"docs/{name} is out of date; regenerate with: python -m trustseg.cli_docs docs")


def test_sub_commands_get_pages_of_their_own():
    found = commands()
    assert "bench-model" in found and found["bench-model"][0] == "trustseg bench model"
    assert "bench" not in found


def test_every_command_shows_a_worked_example_in_its_help():
    missing = [line for line, command in commands().values() if f"Example: {line}" not in (command.help or "")]
    assert not missing, f"commands whose --help lacks 'Example: <the command> ...': {missing}"
