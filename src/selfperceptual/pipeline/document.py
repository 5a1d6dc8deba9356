"""A report as one document (a title, an introduction, sections of tables and figures), rendered
to Markdown and to HTML from the same blocks, so the two never say different things."""

from __future__ import annotations

import html
from dataclasses import dataclass


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


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_markdown(document: Document) -> str:
    parts = [f"# {document.title}\n\n{document.intro}\n"]
    for section in document.sections:
        body = markdown_table(section.table) if section.table else f"![{section.title}]({section.image})" if section.image else ""
        parts.append(f"## {section.title}\n\n{body}\n" + (f"\n{section.note}\n" if section.note else ""))
    return "\n".join(parts)


STYLE = "td,th{padding:2px 8px;border:1px solid #ccc}table{border-collapse:collapse}img{max-width:100%}"


def to_html(document: Document, page_title: str) -> str:
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(page_title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(document.title)}</h1>", f"<p>{html.escape(document.intro)}</p>"]  # fmt: skip
    for section in document.sections:
        title = html.escape(section.title)
        body = html_table(section.table) if section.table else f"<img src='{section.image}' alt='{title}'>" if section.image else ""
        parts.append(f"<h2>{title}</h2>{body}" + (f"<p>{html.escape(section.note)}</p>" if section.note else ""))
    parts.append("</body></html>")
    return "\n".join(parts)
