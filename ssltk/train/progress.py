"""What a person watching a run sees: a progress bar on a terminal, log lines otherwise.

Both go to stderr; stdout is left for the command's one-line result.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """A tqdm bar (``bar=True``) or a line every ``log_every`` steps on stderr."""

    def __init__(
        self, total: int, start: int, *, bar: bool, log_every: int, desc: str = ""
    ) -> None:
        self.total = total
        self.bar = (
            tqdm(
                total=total,
                initial=start,
                desc=desc,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )
            if bar
            else None
        )
        self.log_every = log_every
        self.start_step = start
        self.started = time.perf_counter()

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def report(
        self, step: int, epoch: int, values: Mapping[str, float], images_per_sec: float
    ) -> None:
        """Show the latest figures (after ``step`` updates, in ``epoch``)."""
        shown = {name: f"{value:.4g}" for name, value in values.items()}
        if self.bar is not None:
            self.bar.set_postfix({**shown, "img/s": f"{images_per_sec:.0f}"}, refresh=True)
            return
        if step % self.log_every and step != self.total:
            return
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        fields = " ".join(f"{name} {value}" for name, value in shown.items())
        print(
            f"step {step}/{self.total} epoch {epoch} {fields} {images_per_sec:.0f} img/s "
            f"eta {format_duration(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
