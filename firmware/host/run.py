"""Run the firmware on CPython as an ESP32 runs it: ``python firmware/host/run.py BOARD_DIR``.

``BOARD_DIR`` is the board's filesystem (``lms_config.json``, and ``lms_desired.json`` the
firmware writes); ``boot.py`` then ``main.py`` run from ``firmware/`` with the stand-ins of
this folder for MicroPython's own modules. The console (what ``mpremote`` would show) is
standard output. ``machine.reset()`` starts this script again.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FIRMWARE = os.path.dirname(HERE)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: run.py BOARD_DIR")
    board = os.path.abspath(sys.argv[1])
    # This folder (the stand-ins) is sys.path[0] already, as the script's own folder.
    sys.path.insert(1, FIRMWARE)
    import machine

    machine.RESTART = [sys.executable, os.path.abspath(__file__), board]
    os.chdir(board)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    for name in ("boot.py", "main.py"):
        path = os.path.join(FIRMWARE, name)
        with open(path) as f:
            code = compile(f.read(), path, "exec")
        exec(code, {"__name__": "__main__", "__file__": path})


if __name__ == "__main__":
    main()
