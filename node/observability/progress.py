"""The live progress line a node shows on stderr while it trains (rich)."""

from __future__ import annotations


class ProgressLine:
    """`stage S [bar] done/total loss L N tok/s`, redrawn after every step; `close()` ends it."""

    def __init__(self, total: int, done: int, stage: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.progress = Progress(TextColumn(f"stage {stage}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.description}"), console=Console(stderr=True))
        self.task = self.progress.add_task("", total=total, completed=done)
        self.progress.start()

    def update(self, step: int, loss: float | None, tokens: int, seconds: float) -> None:
        """Show step `step` as done, with its loss (when known) and throughput."""
        tok_s = tokens / seconds if seconds else 0.0
        text = f"loss {loss:.4f} " if loss is not None else ""
        self.progress.update(self.task, completed=step + 1, description=f"{text}{tok_s:,.0f} tok/s")

    def close(self) -> None:
        """Stop redrawing (the last state stays on screen)."""
        self.progress.stop()
