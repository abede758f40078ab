"""Signals seen since ``ssltk`` started. A Ctrl-C or SIGTERM raises KeyboardInterrupt wherever the
process is; should a library's import swallow it, the command still stops before any work."""

seen: list[int] = []


def interrupt(signum: int, frame: object) -> None:
    seen.append(signum)
    raise KeyboardInterrupt
