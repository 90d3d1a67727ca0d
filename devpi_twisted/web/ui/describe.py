"""
A release's description as HTML, the way PyPI shows it: C{readme_renderer}
(reStructuredText, Markdown or plain text by C{Description-Content-Type}),
whose output is sanitised (nh3) before it reaches us.

Rendering is CPU work on text an uploader chose: it runs off the reactor
(the views call it through C{runFile}), and very long descriptions are cut.
"""

import re

from readme_renderer import markdown, rst, txt
from werkzeug.http import parse_options_header

MAX_DESCRIPTION = 512 * 1024
_HEADING = re.compile(r"<(/?)h([1-6])\b")


def _demoted(html: str) -> str:
    """Headings two levels down: the page has its h1 and the description's section an h2."""
    return _HEADING.sub(lambda m: f"<{m.group(1)}h{min(int(m.group(2)) + 2, 6)}", html)


def renderDescription(text: str | None, contentType: str | None) -> str | None:
    """
    Sanitised HTML for C{text}, or L{None} when there is none.  reStructuredText
    that does not parse is shown as plain text, as PyPI does.
    """
    if not text or not isinstance(text, str) or text.strip() in ("", "UNKNOWN"):
        return None
    text = text[:MAX_DESCRIPTION]
    mediaType, params = parse_options_header(contentType or "")
    mediaType = mediaType.lower()
    if mediaType == "text/markdown":
        rendered = markdown.render(text, variant=params.get("variant", "GFM"))
    elif mediaType == "text/plain":
        rendered = txt.render(text)
    else:
        rendered = rst.render(text)
    if rendered is None:
        rendered = txt.render(text)
    return _demoted(rendered)
