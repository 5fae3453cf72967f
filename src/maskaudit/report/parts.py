"""The report's building blocks: images inlined as data URIs, numbers as text, tables for the template.

Kept apart from :mod:`maskaudit.report.html` (which imports the analyses' registry), so that an analysis's own
report section (:attr:`maskaudit.analyses.run.Analysis.section`) can build its tables without an import cycle.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

#: Largest width in pixels of each kind of inlined image; larger ones are downscaled.
WIDTHS = {"chart": 900, "heatmap": 560, "panel": 720, "thumbnail": 160}

#: Tables longer than this are folded into a ``<details>`` element.
FOLD_ROWS = 12


# ------------------------------------------------------------------------------------------ images


def inline_image(path: Path, kind: str = "chart") -> str | None:
    """A data URI of the image at ``path``, downscaled to :data:`WIDTHS` ``[kind]``.

    Parameters
    ----------
    path : Path
        A PNG (or any format Pillow reads).
    kind : {"chart", "heatmap", "panel", "thumbnail"}
        Charts and heatmaps stay PNG (sharp lines and text); panels of images and thumbnails are
        JPEG, which keeps photographs several times smaller.

    Returns
    -------
    str or None
        ``data:image/...;base64,...``, or None when the file does not exist.
    """
    if not path.is_file():
        return None
    with Image.open(path) as image:
        image.load()
        width = WIDTHS[kind]
        if image.width > width:
            image = image.resize((width, max(1, round(image.height * width / image.width))), Image.LANCZOS)
        buffer = io.BytesIO()
        if kind in ("panel", "thumbnail"):
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                flat = Image.new("RGB", image.size, "white")
                flat.paste(image, mask=image.getchannel("A"))
                image = flat
            elif image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            image.save(buffer, format="JPEG", quality=80, optimize=True)
            mime = "image/jpeg"
        else:  # a 256-colour palette: charts have few colours, and the file shrinks several times
            flat = image.convert("RGBA")
            image = flat.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
            image.save(buffer, format="PNG", optimize=True)
            mime = "image/png"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------ tables


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float | np.floating) and np.isnan(value))


def _fmt(value: object) -> str:
    """Floats with three decimals, missing values empty, anything else as it is."""
    if _missing(value):
        return ""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return f"{value:.3f}"
    return str(value)


def fmt_p(value: object) -> str:
    """A p-value: three significant digits, ``< 0.001`` below that."""
    if _missing(value):
        return ""
    return "< 0.001" if float(value) < 0.001 else f"{float(value):.3f}"


def fmt_auc(auc: object, low: object = None, high: object = None) -> str:
    """``0.972 [0.948, 0.996]``; the AUC alone when the interval is missing; empty for NaN."""
    if _missing(auc):
        return ""
    if _missing(low) or _missing(high):
        return f"{float(auc):.3f}"
    return f"{float(auc):.3f} [{float(low):.3f}, {float(high):.3f}]"


@dataclass
class Table:
    """A table ready for the template: header and rows of cells, each a dict of text, title, style, left."""

    caption: str
    header: list[str]
    rows: list[list[dict[str, Any]]] = field(default_factory=list)
    folded: bool = False
    corner: bool = False  # the first column is a header column (a matrix)

    @property
    def n_rows(self) -> int:
        return len(self.rows)


def _cell(text: object, title: str = "", style: str = "", left: bool = False, mark: str = "") -> dict[str, Any]:
    return {"text": text if isinstance(text, str) else _fmt(text), "title": title, "style": style, "left": left,
            "mark": mark}


def frame_table(frame: pd.DataFrame, caption: str, formats: dict[str, Callable[[pd.Series], str]] | None = None,
                columns: list[str] | None = None) -> Table:
    """A data frame as a :class:`Table`.

    Parameters
    ----------
    frame : DataFrame
        The rows to show.
    caption : str
        Says what the table holds.
    formats : dict, optional
        ``{header: function(row) -> text}``: computed columns, in order; without it every column
        of ``frame`` (or of ``columns``) is shown with :func:`_fmt`.
    columns : list of str, optional
        Columns of ``frame`` to show when ``formats`` is not given.

    Returns
    -------
    Table
        Folded when it has more than :data:`FOLD_ROWS` rows.
    """
    if formats is None:
        formats = {c: (lambda row, c=c: _fmt(row[c])) for c in (columns or list(frame.columns))}
    texts = [[formatter(row) for formatter in formats.values()] for _, row in frame.iterrows()]
    keep = [k for k in range(len(formats)) if any(t[k] for t in texts)]  # a column empty everywhere says nothing
    rows = [[_cell(t[k], left=not (t[k][:1].isdigit() or t[k][:1] in "-−<" or t[k] == "")) for k in keep]
            for t in texts]
    return Table(caption, [list(formats)[k] for k in keep], rows, folded=len(rows) > FOLD_ROWS)
