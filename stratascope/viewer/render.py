"""Small pure functions that build the viewer's HTML and its embedded JSON, escaped.

Corpus and tokenizer text is data, never markup: every string that reaches HTML goes
through `html.escape`, and JSON embedded in a page has `<`, `>`, `&` (and the JavaScript
line separators) written as \\u escapes, so no payload can close its <script> element.
The browser side only ever sets text with textContent (see static/core.js).
"""

from __future__ import annotations

import html
import json
import unicodedata
from importlib.resources import files

# Characters a token label shows as a symbol: a leading space is the most common case.
_SYMBOLS = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
# Any other character of these categories would be invisible (or reorder the text around it): control
# (C0, DEL, C1), format (zero-width, BOM, bidi), lone surrogates, and every other Unicode space or separator.
_ESCAPED = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def token_label(token: str) -> str:
    """A readable label for a token: space ␣, newline ↵, tab ⇥, carriage return ␍, any other invisible
    character as its code point (no-break space ⟨U+00A0⟩, zero-width space ⟨U+200B⟩); the empty token ∅.
    static/core.js has the same function (Stratascope.tokenLabel) for text the browser labels itself."""
    if not token:
        return "∅"
    if token.isprintable() and " " not in token:  # the common case, and every character kept as it is
        return token
    return "".join(_SYMBOLS.get(c) or (f"⟨U+{ord(c):04X}⟩" if unicodedata.category(c) in _ESCAPED else c)
                   for c in token)


def escape(text: object) -> str:
    """HTML-escape any value for element text or a quoted attribute."""
    return html.escape(str(text), quote=True)


def json_for_html(obj: object) -> str:
    """JSON that is safe inside a <script type="application/json"> element."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, repl in _JSON_ESCAPES.items():
        text = text.replace(char, repl)
    return text


def json_script(element_id: str, obj: object) -> str:
    return f'<script type="application/json" id="{escape(element_id)}">{json_for_html(obj)}</script>'


def static_text(name: str) -> str:
    """A file shipped in stratascope/viewer/static (CSS, JS, or plotly's bundle)."""
    return (files("stratascope.viewer") / "static" / name).read_text(encoding="utf-8")


def plotly_js() -> str:
    """plotly.js as bundled in the plotly package: embedded in reports, served by the app; no CDN."""
    return (files("plotly") / "package_data" / "plotly.min.js").read_text(encoding="utf-8")


def inline_script(code: str) -> str:
    # A bundled script could in principle hold "</script"; break it so the element cannot end early.
    return "<script>" + code.replace("</script", "<\\/script") + "</script>"


def header(meta: dict) -> str:
    """The page's title bar: store, model, sizes, and what a report includes."""
    m = meta["model"]
    facts = (f"{m['name']} · {m['n_layers']} layers · {m['n_heads']} heads · "
             f"{meta['n_prompts']} prompts · {meta['n_tokens']} tokens")
    included = meta.get("included_note")
    note = f'<p class="ss-note" id="ss-included">{escape(included)}</p>' if included else ""
    return (f'<header class="ss-header"><h1>stratascope <span class="ss-store">{escape(meta["store"])}</span></h1>'
            f'<p class="ss-facts">{escape(facts)}</p>{note}</header>')


def page(title: str, meta: dict, head_extra: str, scripts: str, data: dict | None = None) -> str:
    """A whole viewer page: header, an empty root the scripts fill, meta (and report data) as JSON."""
    payload = json_script("ss-meta", meta) + (json_script("ss-data", data) if data is not None else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<link rel=\"icon\" href=\"data:,\"><title>{escape(title)}</title>"
            f"{head_extra}</head><body>{header(meta)}<main id=\"ss-root\"></main>{payload}{scripts}</body></html>\n")


def iframe(document: str, height: int = 720) -> str:
    """A whole page inside an iframe (for notebooks): its scripts and styles stay apart from the notebook's."""
    return (f'<iframe srcdoc="{escape(document)}" style="width:100%;height:{int(height)}px;border:1px solid #ddd" '
            'sandbox="allow-scripts allow-downloads allow-popups"></iframe>')
