"""``python -m ssltk``: the command line. SIGTERM ends a command as Ctrl-C does, and either one
during the seconds of imports is one line and exit 130, not a traceback or a silent 143."""

import signal
import sys

from ssltk._startup import interrupt


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        from ssltk.cli import app
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    app(prog_name="ssltk")


if __name__ == "__main__":
    main()
