"""A small terminal chart of a series (the demo's loss curve): columns of block characters, y labels left."""

from __future__ import annotations

import math

BLOCKS = " ▁▂▃▄▅▆▇█"  # eighths of a cell, empty to full


def _buckets(values: list[float], width: int) -> list[float]:
    """`values` averaged into at most `width` columns (in order)."""
    if len(values) <= width:
        return list(values)
    out = []
    for i in range(width):
        lo, hi = i * len(values) // width, (i + 1) * len(values) // width
        chunk = values[lo:max(hi, lo + 1)]
        out.append(sum(chunk) / len(chunk))
    return out


def bar_chart(values: list[float], width: int = 60, height: int = 6, label: str = "") -> str:
    """Lines of a column chart of `values` (averaged into at most `width` columns, `height` rows), with the
    max and min on the left and `label` plus the x range below. Non-finite values are skipped."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return f"{label}: no values"
    cols = _buckets(vals, width)
    top, low = max(cols), min(cols)
    span = (top - low) or 1.0
    levels = [round((v - low) / span * (height * 8 - 1)) + 1 for v in cols]  # 1..height*8 eighths
    ylab = [f"{top:.2f}", f"{low:.2f}"]
    pad = max(len(x) for x in ylab)
    lines = []
    for row in range(height - 1, -1, -1):
        cells = "".join(BLOCKS[min(8, max(0, lvl - row * 8))] for lvl in levels)
        y = ylab[0] if row == height - 1 else ylab[1] if row == 0 else ""
        lines.append(f"{y:>{pad}} ┤{cells}")
    lines.append(" " * pad + " └" + "─" * len(cols))
    lines.append(" " * pad + f"  {label} over {len(vals)} steps" + (f", {len(vals) // len(cols)} per column"
                                                                       if len(vals) > len(cols) else ""))
    return "\n".join(lines)
