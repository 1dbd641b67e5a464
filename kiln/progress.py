"""Progress of long steps on stderr: a spinner while a step runs, its time when it ends."""
from __future__ import annotations

from rich.console import Console


class StepPrinter:
    def __init__(self):
        self.console = Console(stderr=True)
        self._status = None

    def on_step(self, name: str, seconds: float | None) -> None:
        if seconds is None:
            self._status = self.console.status(f"{name}…")
            self._status.start()
            return
        self._stop()
        self.console.print(f"[green]✓[/green] {name} [dim]{seconds:.1f}s[/dim]")

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._stop()
