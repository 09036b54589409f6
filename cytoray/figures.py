"""Matplotlib figures without pyplot: no global backend switch, no figure registry that keeps figures alive.

Library code draws on :func:`figure` and serialises with :func:`png_bytes`; whatever backend the user's process
(a notebook, a GUI) selected stays selected.
"""

from __future__ import annotations

import io


def figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, squeeze: bool = True):
    """(Figure on its own Agg canvas, axes) — like ``plt.subplots``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def png_bytes(fig, dpi: int = 100, tight: bool = True) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    return buf.getvalue()


def colormap(name: str, n: int):
    from matplotlib import colormaps

    return colormaps[name].resampled(n)
