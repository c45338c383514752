"""A report as a list of blocks (headings, paragraphs, tables, images), rendered to Markdown and to one
self-contained HTML file (images embedded), so both formats always say the same thing."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trustseg.engine.checkpoint import atomic_write
from trustseg.report.tables import markdown_table

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:1em 0}
figcaption{color:#555;font-size:13px}"""


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str) -> Document:
        self.blocks.append(("heading", text))
        return self

    def paragraph(self, text: str) -> Document:
        self.blocks.append(("paragraph", text))
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Document:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))
        return self

    def image(self, path: Path, caption: str) -> Document:
        self.blocks.append(("image", (Path(path), caption)))
        return self

    def to_markdown(self, base: Path) -> str:
        """Markdown with images linked relative to ``base`` (the folder the .md file is written to)."""
        parts = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                parts += [f"## {value}", ""]
            elif kind == "paragraph":
                parts += [str(value), ""]
            elif kind == "table":
                parts += [markdown_table(*value)]
            else:
                path, caption = value
                parts += [f"![{caption}]({path.relative_to(base) if path.is_relative_to(base) else path})", ""]
        return "\n".join(parts)

    def to_html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                body.append(f"<h2>{html.escape(str(value))}</h2>")
            elif kind == "paragraph":
                body.append(f"<p>{html.escape(str(value))}</p>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                body.append(f"<table><tr>{head}</tr>{cells}</table>")
            else:
                path, caption = value
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")

    def write(self, folder: Path, stem: str = "report") -> tuple[Path, Path]:
        """Write ``stem.md`` and ``stem.html`` into ``folder``."""
        folder = Path(folder)
        markdown, page = folder / f"{stem}.md", folder / f"{stem}.html"
        for path, text in ((markdown, self.to_markdown(folder)), (page, self.to_html())):
            atomic_write(path, lambda handle: handle.write(text.encode()))
        return markdown, page
