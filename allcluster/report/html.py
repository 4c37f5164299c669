"""Rendering: tables as HTML and Markdown, and the report's one self-contained ``index.html``.

The page references nothing outside the report folder: the CSS is inline, there is no script, and
every image is a relative path to a PNG/JPEG copied into the folder, so the folder can be copied off
the cluster and opened from disk on a laptop (no server, no network).
"""
from __future__ import annotations

import math
from html import escape
from pathlib import PurePath

import pandas as pd

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d232b;background:#fff}
h1{font-size:1.6em;margin-bottom:0}h2{border-bottom:2px solid #d0d7de;padding-bottom:4px;margin-top:40px}
h3{margin-top:28px}.sub{color:#57606a;margin-top:4px}nav a{margin-right:14px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 4px}th,td{border:1px solid #d0d7de;padding:3px 7px}
th{background:#f3f5f7;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}.note{background:#fff8c5;border:1px solid #e3d37a;padding:6px 10px}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}figure img{max-width:100%;border:1px solid #d0d7de}
figcaption{font-size:12px;color:#57606a;max-width:420px}img.thumb{width:64px;height:64px;object-fit:cover}
.gallery figure{width:170px}.gallery figure img{width:160px;height:160px;object-fit:cover}
.scroll{overflow-x:auto;max-width:100%}
"""


def format_value(value) -> str:
    """A table cell as text: 4 decimals for floats (small ones in e-notation), blanks for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float):
        return f"{value:.2e}" if value and abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    def cells(values) -> str:
        return "| " + " | ".join(format_value(v).replace("|", "\\|").replace("\n", " ") for v in values) + " |"
    lines = [cells(df.columns), "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += [cells(row) for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _cell(value, image: bool) -> str:
    if image:
        if not value:
            return "<td></td>"
        src = escape(str(value))
        return f'<td><a href="{src}"><img class="thumb" src="{src}" alt="overlay"></a></td>'
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="n">{escape(format_value(value))}</td>' if numeric else f"<td>{escape(format_value(value))}</td>"


def table_html(df: pd.DataFrame, table_id: str, image_columns: tuple[str, ...] = ()) -> str:
    """An HTML table; cells of ``image_columns`` hold relative image paths shown as thumbnails."""
    head = "".join(f"<th>{escape(str(c))}</th>" for c in df.columns)
    flags = [c in image_columns for c in df.columns]
    body = "".join("<tr>" + "".join(_cell(v, f) for v, f in zip(row, flags)) + "</tr>"
                   for row in df.itertuples(index=False))
    return (f'<div class="scroll"><table id="{escape(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def figure_html(src: str, caption: str, figure_id: str = "") -> str:
    ident = f' id="{escape(figure_id)}"' if figure_id else ""
    return (f'<figure{ident}><img src="{escape(src)}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def note_html(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def heading(text: str, level: int = 3) -> str:
    return f"<h{level}>{escape(text)}</h{level}>"


def paragraph(text: str, css: str = "") -> str:
    return f'<p class="{css}">{escape(text)}</p>' if css else f"<p>{escape(text)}</p>"


def gallery_html(items: pd.DataFrame) -> str:
    """Overlays grouped by predicted class then kind; ``items`` has predicted_class, kind, image
    (relative path), confidence, path and optionally label."""
    parts = ['<div class="gallery" id="gallery">']
    for (name, kind), group in items.groupby(["predicted_class", "kind"], sort=True):
        parts.append(heading(f"{name}: {kind}", 4))
        for row in group.itertuples(index=False):
            label = getattr(row, "label", None)
            label = label if isinstance(label, str) else ""        # a missing label is NaN in pandas 3
            caption = (f"p={row.confidence:.3f}" + (f", true {label}" if label else "") + f" - {PurePath(row.path).name}"
                       + (f" ({row.heatmap_method})" if getattr(row, "heatmap_method", "") else ""))
            parts.append(figure_html(row.image, caption))
    parts.append("</div>")
    return "".join(parts)


def page(title: str, subtitle: str, sections: list[tuple[str, str, list[str]]]) -> str:
    """The whole document: ``sections`` are (id, title, HTML parts)."""
    nav = "".join(f'<a href="#{escape(i)}">{escape(t)}</a>' for i, t, _ in sections)
    body = "".join(f'<section id="{escape(i)}"><h2>{escape(t)}</h2>{"".join(parts)}</section>'
                   for i, t, parts in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><h1>{escape(title)}</h1><p class="sub">{escape(subtitle)}</p><nav>{nav}</nav>{body}'
            "</body></html>\n")
