"""What every interactive view shares: checking a prompt, turning a figure into PNG bytes, and a
base class whose ``update()`` shows a clear message instead of a traceback when the input is bad.

Introduced in notebooks/02_q_k_v.ipynb, the first notebook with a widget.
"""

from __future__ import annotations

import html
import io

import ipywidgets as widgets
import matplotlib.pyplot as plt

from ..errors import CourseError, InputError


def prompt_ids(tokenizer, prompt: str, max_tokens: int, reserved: int = 0) -> list[int]:
    """Token ids of ``prompt``, or a :class:`CourseError` that says what to change.

    Raises for an empty prompt, a character the tokenizer lacks (``TokenizerError``) and a
    prompt of more than ``max_tokens`` tokens (the model's context, less ``reserved`` positions
    kept for tokens still to be generated).
    """
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InputError("the prompt is empty: type at least one word")
    ids = tokenizer.encode(prompt)
    if len(ids) > max_tokens:
        if reserved:
            raise InputError(f"the prompt is {len(ids)} tokens long, but only {max_tokens} of the model's "
                             f"{max_tokens + reserved} positions are left after the {reserved} tokens to "
                             f"generate; shorten it")
        raise InputError(f"the prompt is {len(ids)} tokens long but the model's context holds "
                         f"{max_tokens}; shorten it")
    return ids


def figure_png(fig, dpi: int = 80) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it (nothing is left open)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def tight_bbox(fig, pad: float = 0.15):
    """The box (inches) around everything drawn on ``fig``, plus ``pad``: measured once when a
    widget builds its figure, then handed to :func:`canvas_png` on every update."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    return fig.get_tightbbox(renderer).padded(pad)


def canvas_png(fig, dpi: int = 80, bbox=None) -> bytes:
    """Render a figure that a widget keeps (and updates) to PNG bytes, as it stands.

    Unlike :func:`figure_png` the figure stays open for the next update, and the crop box
    ``bbox`` (from :func:`tight_bbox`, measured once) replaces ``bbox_inches="tight"``, which
    measures the figure again with a second drawing pass every time.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=bbox)
    return buf.getvalue()


def draw_background(fig, moving: list, dpi: int):
    """Draw ``fig`` at ``dpi`` with the ``moving`` artists hidden and keep its pixels (for :func:`blit_png`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    for a in moving:
        a.set_visible(False)
    try:
        fig.canvas.draw()
    finally:
        for a in moving:
            a.set_visible(True)
    return fig.canvas.copy_from_bbox(fig.bbox)


def blit_png(fig, background, moving: list, bbox) -> bytes:
    """The kept background's pixels with the ``moving`` artists drawn over them, cropped to
    ``bbox`` (inches, from :func:`tight_bbox`), as PNG bytes."""
    import numpy as np
    from PIL import Image

    canvas = fig.canvas
    canvas.restore_region(background)
    for a in moving:
        fig.draw_artist(a)
    rgba = np.asarray(canvas.buffer_rgba())                     # (height px, width px, 4)
    height, width = rgba.shape[:2]
    dpi = fig.dpi
    x0, x1 = max(0, int(bbox.x0 * dpi)), min(width, int(np.ceil(bbox.x1 * dpi)))
    y0, y1 = max(0, int(height - bbox.y1 * dpi)), min(height, int(np.ceil(height - bbox.y0 * dpi)))
    buf = io.BytesIO()
    Image.fromarray(rgba[y0:y1, x0:x1]).save(buf, format="png", compress_level=1)
    return buf.getvalue()


def detach_figure(fig):
    """Take a figure out of pyplot's list of open figures (the notebook will not show it by
    itself at the end of the cell) and return it: a widget keeps it and redraws it on demand."""
    plt.close(fig)
    return fig


def _html_output(body: str, plain: str) -> dict:
    return {"output_type": "display_data", "metadata": {},
            "data": {"text/plain": plain, "text/html": body}}


class Explorer(widgets.VBox):
    """A control panel, an Output for text and messages, and an Image for the figure.

    Subclasses build ``controls`` (laid out top to bottom), name the value widgets to ``watch``
    (default: the controls themselves) and implement ``compute()`` (returns ``(summary_text, png)``)
    from the controls' values. Any change re-runs :meth:`update`; a :class:`CourseError` (or any
    other exception) becomes a message in the Output and the widget keeps working.

    The figure is built once and then updated: a subclass implements ``draw(views)`` (builds
    ``self.fig`` and keeps its artists) and ``refresh(views)`` (changes those artists' data), and
    calls :meth:`render` from ``compute()``. ``render`` draws afresh only when ``layout_key``
    (for instance the prompt's tokens) differs from the last one, into the same Figure object.
    """

    fig = None            # the figure this explorer keeps and updates
    _layout_key = None    # what the figure's layout was built for

    def draw(self, views) -> None:  # pragma: no cover - subclasses with a figure override it
        raise NotImplementedError

    def refresh(self, views) -> None:  # pragma: no cover - subclasses with a figure override it
        raise NotImplementedError

    def moving_artists(self) -> list:
        """Artists that change when only the cheap controls move (see :meth:`render`); none by default."""
        return []

    def render(self, views, layout_key, dpi: int = 80, background_key=None) -> bytes:
        """Update the kept figure for ``views`` (rebuilt only for a new ``layout_key``); PNG bytes.

        With a ``background_key`` (what every artist outside :meth:`moving_artists` depends on),
        the figure is drawn in two layers: the still background is drawn once per key and kept as
        pixels; a move that leaves the key alone pastes those pixels back and draws only the
        moving artists on top (matplotlib's blitting). Notebook 03's query slider moves a row
        outline and a bar chart over five heatmaps full of numbers: drawing hundreds of numbers
        again for every move is what made it slow."""
        rebuilt = self.fig is None or layout_key != self._layout_key
        if rebuilt:
            self.draw(views)
            self._layout_key = layout_key
            self._bbox = tight_bbox(self.fig)
            self._background = None
        else:
            self.refresh(views)
        if background_key is None:
            return canvas_png(self.fig, dpi, self._bbox)
        if rebuilt or self._background is None or background_key != self._background[0]:
            self._background = (background_key, draw_background(self.fig, self.moving_artists(), dpi))
        return blit_png(self.fig, self._background[1], self.moving_artists(), self._bbox)

    def __init__(self, controls: list, watch: list | None = None):
        self.output = widgets.Output()
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.message: str | None = None   # the last error message, None after a good update
        self.summary: str = ""            # the last summary text
        super().__init__(children=[*controls, self.output, self.image])
        for c in (watch if watch is not None else controls):
            c.observe(self._on_change, names="value")

    def _on_change(self, change) -> None:
        self.update()

    def compute(self) -> tuple[str, bytes]:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def show_text(self, text: str, error: bool = False) -> None:
        color = "#b00020" if error else "#222222"
        body = f'<pre style="color:{color}; white-space:pre-wrap; margin:0">{html.escape(text)}</pre>'
        self.output.outputs = (_html_output(body, text),)

    def update(self) -> None:
        """Recompute from the controls' current values; show the result or a clear message."""
        try:
            summary, png = self.compute()
        except CourseError as e:
            self.message = str(e)
            self.show_text(f"⚠ {e}", error=True)
            self.image.value = b""
            return
        except Exception as e:  # noqa: BLE001 - a widget must never die on input
            self.message = f"{type(e).__name__}: {e}"
            self.show_text(f"⚠ unexpected problem ({self.message}); try another input", error=True)
            self.image.value = b""
            return
        self.message = None
        self.summary = summary
        self.show_text(summary)
        self.image.value = png
