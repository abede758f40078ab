"""``python -m ssltk``: the command line, with Ctrl-C during its seconds of imports one line too."""

import sys


def main() -> None:
    try:
        from ssltk.cli import app
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    app(prog_name="ssltk")


if __name__ == "__main__":
    main()
