"""HTML building blocks for the evaluation pages: escaping, value formatting, tables, embedded PNG figures,
"not available" notes for unreadable inputs, and the page itself (inline CSS, no external resources).

Every eval task that writes a page (report, and later watermark / robustness / safety) composes these.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import zipfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from jaxdiff import files

MAX_LIST_ITEMS = 10        # longer lists in a table cell are summarised as "[N items]"

# What reading a damaged JSON / PNG / npz file raises (PIL reports some broken PNG chunks as SyntaxError).
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, KeyError, zipfile.BadZipFile)


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #222; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
.meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.file { color: #666; }
.na { color: #8a5300; font-style: italic; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
img.plot { image-rendering: auto; }
pre { background: #f7f7f7; padding: 0.8em; overflow: auto; max-height: 40em; font-size: 0.85em; }
"""


def esc(value: Any) -> str:
    """Text escaped for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def reason(error: BaseException) -> str:
    """One line for an exception: the OS message for OSErrors (the path is named by the caller), else its text."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return ' '.join(text.split()) or type(error).__name__


def unavailable(why: str) -> str:
    """The one-line placeholder for a section or item whose input is missing or unreadable."""
    return f'<p class="na">not available: {esc(why)}</p>'


def format_value(value: Any) -> str:
    """A table cell's text: floats to 4 significant digits, short lists inline, long ones as "[N items]"."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f'{value:.4g}'
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST_ITEMS or any(isinstance(v, (list, tuple, dict)) for v in value):
            return f'[{len(value)} items]'
        return '[' + ', '.join(format_value(v) for v in value) + ']'
    return str(value)


def cell(value: Any) -> str:
    """One <td> holding ``value`` formatted, right-aligned when numeric."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td{" class=num" if numeric else ""}>{esc(format_value(value))}</td>'


def key_value_table(items: Mapping[str, Any]) -> str:
    """A two-column table of field names and values."""
    rows = ''.join(f'<tr><th>{esc(k)}</th>{cell(v)}</tr>' for k, v in items.items())
    return f'<table>{rows}</table>'


def flatten(obj: Mapping, prefix: str = '') -> dict[str, Any]:
    """Nested dicts -> one dict with dotted keys, in order; other values (lists included) are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f'{prefix}{key}'
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + '.'))
        else:
            out[name] = value
    return out


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> PNG file bytes."""
    image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    return buffer.getvalue()


def read_png(path: str) -> bytes:
    """A PNG file's bytes, decoded once to check them: a truncated or non-PNG file raises (see READ_ERRORS)."""
    with open(path, 'rb') as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        if image.format != 'PNG':
            raise ValueError(f'not a PNG file ({image.format})')
        image.load()
    return data


def figure(png: bytes, caption: str, css: str = '') -> str:
    """A captioned <img> holding ``png`` as a base64 data URI."""
    data = base64.b64encode(png).decode('ascii')
    extra = f' class="{css}"' if css else ''
    return (f'<figure><img{extra} alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{esc(caption)}</figcaption></figure>')


def read_json(path: str) -> Any:
    """A JSON file's value (raises OSError / ValueError when missing or corrupt)."""
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def read_json_object(path: str) -> dict:
    """A JSON file holding one object (config.json, manifest.json); raises ValueError for any other value."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError('not a JSON object')
    return value


def render_page(title: str, sections: Sequence[tuple[Optional[str], str]]) -> str:
    """The full HTML document: inline CSS, then each (heading or None, body html) section."""
    body = '\n'.join((f'<h2>{esc(h)}</h2>\n' if h else '') + content for h, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n')


def write_text(path: str, text: str) -> None:
    """Write ``path`` through a temporary file, so an interrupted run never leaves half a report."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_bytes(path, text.encode('utf-8'))
