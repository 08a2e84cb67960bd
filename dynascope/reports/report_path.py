"""The object ``dynascope.report`` returns: the written file's path, which a notebook
displays inline (a sandboxed iframe), without importing IPython."""

from __future__ import annotations

import html
from pathlib import Path

__all__ = ["ReportPath", "IFRAME_HEIGHT"]

IFRAME_HEIGHT = "80vh"


class ReportPath(type(Path())):  # type: ignore[misc]  # PosixPath / WindowsPath: subclassing Path needs 3.12
    """Path of a written report; in a notebook it shows the report inline (sandboxed iframe)."""

    def _repr_html_(self) -> str | None:
        if self.suffix.lower() not in (".html", ".htm") or not self.is_file():
            return None  # a folder of PNG/PDF figures: the plain path repr
        page = self.read_text(encoding="utf-8")
        # a srcdoc document resolves "#fig-..." against the notebook's URL, so the report's links would try
        # to load the notebook page into the frame; this base keeps them in-page
        page = page.replace("<head>", '<head>\n<base href="about:srcdoc">', 1)
        return (f'<iframe sandbox="allow-scripts" title="{html.escape(self.name)}" '
                f'style="width: 100%; height: {IFRAME_HEIGHT}; border: 1px solid #d0d7de" '
                f'srcdoc="{html.escape(page, quote=True)}"></iframe>')
