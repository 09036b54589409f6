"""Self-contained HTML pages (``report.html``, ``training.html``): figures embedded as data URIs, tables, and a
render check.

The page's script counts the images the browser decoded and writes the count into ``#render-check``
(``data-loaded`` / ``data-total``), which the headless-browser tests read.
"""

from __future__ import annotations

import base64
import html

CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f2f2f2}td:first-child{text-align:left}
h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}.note{color:#555;font-size:13px}"""

RENDER_CHECK = "<p id='render-check' class='note'>images not yet rendered</p>"

SCRIPT = """window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  var el = document.getElementById('render-check');
  el.textContent = ok + ' of ' + imgs.length + ' images rendered';
  el.setAttribute('data-loaded', ok); el.setAttribute('data-total', imgs.length);
});"""


def png_uri(fig, dpi: int = 90) -> str:
    """A matplotlib figure as a ``data:image/png`` URI."""
    from cytoray.figures import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(fig, dpi=dpi)).decode()


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str, css: str = "") -> str:
    """The whole document: shared styles (+ ``css``), the render-check script, ``body``."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}\n{css}</style><script>{SCRIPT}</script></head><body>{body}</body></html>")
