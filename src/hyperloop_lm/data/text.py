"""Text hygiene shared by every corpus source: decoding, normalization, Gutenberg boilerplate."""
from __future__ import annotations

import re
import unicodedata

_REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = _REPLACEMENT.encode()

# Project Gutenberg wraps its texts in license headers/footers; they are not the author's prose.
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.I | re.M
)


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 decode with errors='replace'; return (text, number of invalid sequences replaced).

    Replacement characters that were already in the input (valid U+FFFD) are not counted.
    """
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count(_REPLACEMENT) - raw.count(_REPLACEMENT_UTF8)
    return text, replaced


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header (up to '*** START OF ...') and footer ('*** END OF ...')."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def normalize(text: str) -> str:
    """NFC, Unix newlines, no BOM, no Gutenberg boilerplate, no trailing spaces or blank edges.

    Idempotent, so sources may normalize early (e.g. before slicing) and the writer again.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = strip_gutenberg(text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return text.strip("\n ").rstrip() + "\n" if text.strip() else ""
