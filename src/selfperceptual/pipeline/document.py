"""A report as one document (a title, an introduction, sections of tables and figures), rendered
to Markdown and to HTML from the same blocks, so the two never say different things; its tables
also as CSV files (Snakemake's report shows them as tables)."""

from __future__ import annotations

import csv
import html
import re
from dataclasses import dataclass
from pathlib import Path


class Links(str):
    """A table cell of links (text, url): its text is the texts (JSON and CSV keep that), Markdown
    and HTML make them links."""

    links: tuple[tuple[str, str], ...]

    def __new__(cls, links):
        cell = super().__new__(cls, " ".join(text for text, _ in links) or "—")
        cell.links = tuple(links)
        return cell


class Marked(str):
    """A table cell shown with a mark of its kind (a verdict): HTML colours it by ``kind``."""

    kind: str

    def __new__(cls, text: str, kind: str):
        cell = super().__new__(cls, text)
        cell.kind = kind
        return cell


@dataclass(frozen=True)
class Section:
    title: str
    table: list[list[str]] | None = None  # a header row, then the rows
    image: str | None = None  # a file beside the document
    note: str = ""  # what to read it with (legend, caveats)


@dataclass(frozen=True)
class Document:
    title: str
    intro: str
    sections: list[Section]


def _markdown_cell(cell: str) -> str:
    if isinstance(cell, Links):
        return " ".join(f"[{text}]({url})" for text, url in cell.links) or "—"
    return cell.replace("|", "\\|").replace("\n", "<br>")  # a line break inside a cell: GitHub's Markdown takes <br>


def _html_cell(cell: str) -> str:
    if isinstance(cell, Links):
        return " ".join(f"<a href='{html.escape(url)}'>{html.escape(text)}</a>" for text, url in cell.links) or "—"
    if isinstance(cell, Marked):
        return f"<span class='mark {html.escape(cell.kind)}'>{html.escape(cell)}</span>"
    return html.escape(cell).replace("\n", "<br>")


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in rows[1:]]
    return "\n".join(lines)


def html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_html_cell(cell)}</td>" for cell in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def anchor(title: str) -> str:
    """A section's anchor, as GitHub makes it from a Markdown heading (the HTML uses the same)."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def to_markdown(document: Document) -> str:
    contents = "\n".join(f"- [{section.title}](#{anchor(section.title)})" for section in document.sections)
    parts = [f"# {document.title}\n\n{document.intro}\n", f"**Contents**\n\n{contents}\n"]
    for section in document.sections:
        body = markdown_table(section.table) if section.table else f"![{section.title}]({section.image})" if section.image else ""
        parts.append(f"## {section.title}\n\n{body}\n" + (f"\n{section.note}\n" if section.note else ""))
    return "\n".join(parts)


STYLE = ("td,th{padding:2px 8px;border:1px solid #ccc}table{border-collapse:collapse}img{max-width:100%}"
         ".mark{font-weight:bold;white-space:nowrap}.supported{color:#1a7f37}.contradicted{color:#cf222e}"
         ".unresolved{color:#9a6700}.not-evaluated{color:#6e7781}")


def to_html(document: Document, page_title: str) -> str:
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(page_title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(document.title)}</h1>", f"<p>{html.escape(document.intro)}</p>"]  # fmt: skip
    contents = "".join(f"<li><a href='#{anchor(section.title)}'>{html.escape(section.title)}</a></li>" for section in document.sections)
    parts.append(f"<nav><b>Contents</b><ul>{contents}</ul></nav>")
    for section in document.sections:
        title = html.escape(section.title)
        body = html_table(section.table) if section.table else f"<img src='{section.image}' alt='{title}'>" if section.image else ""
        parts.append(f"<h2 id='{anchor(section.title)}'>{title}</h2>{body}" + (f"<p>{html.escape(section.note)}</p>" if section.note else ""))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_tables(document: Document, folder: Path) -> list[Path]:
    """Each table of the document as ``folder/NN_<title>.csv`` (NN: its place in the document)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number, section in enumerate(document.sections, 1):
        if section.table:
            slug = re.sub(r"[^a-z0-9]+", "_", section.title.lower()).strip("_")[:60]
            path = folder / f"{number:02d}_{slug}.csv"
            with path.open("w", newline="") as handle:
                csv.writer(handle).writerows(section.table)
            written.append(path)
    return written
