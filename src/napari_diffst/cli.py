"""Console script ``napari-diffst``: demo / info / train / sample / evaluate / benchmark / bench-speed.

Every command prints a progress bar and turns bad input into a one-line error (exit code 2).
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import DiffSTError

HEADLESS_DEMO = (
    "napari-diffst train --data synthetic --scale 5 --budget quick --out runs/demo && "
    "napari-diffst sample --checkpoint runs/demo --data synthetic --steps 50 --out runs/demo/maps.zarr && "
    "napari-diffst evaluate --pred runs/demo/maps.zarr --data synthetic"
)


def _has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_demo(args) -> int:
    """Open napari with the synthetic sample and the "Super-resolve ST" dock."""
    if not _has_display() or args.headless:
        print("No display found: napari needs a screen (or run under `xvfb-run -a`).")
        print("Headless equivalent on a server:\n  " + HEADLESS_DEMO)
        return 0
    import napari

    viewer = napari.Viewer(title="napari-diffst demo")
    viewer.open_sample("napari-diffst", "synthetic")
    viewer.window.add_plugin_dock_widget("napari-diffst", "Super-resolve ST")
    from ._widgets.demo import fit_demo_window  # Qt lives in the widget layer

    fit_demo_window(viewer)
    if args.no_run:
        return 0
    napari.run()
    return 0


def cmd_info(args) -> int:
    from .io import read

    for p in args.paths:
        s = read(p)
        print(s.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="napari-diffst", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="open napari with the synthetic sample and the Super-resolve ST dock")
    d.add_argument("--headless", action="store_true", help="only print the headless equivalent")
    d.add_argument("--no-run", action="store_true", help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="read ST data and print what was found")
    i.add_argument("paths", nargs="+")
    i.set_defaults(func=cmd_info)

    try:  # engine commands live beside the engine
        from . import _cli_engine

        _cli_engine.add_commands(sub)
    except ModuleNotFoundError as exc:  # pragma: no cover - during development only
        if exc.name != f"{__package__}._cli_engine":
            raise
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DiffSTError as exc:
        print(f"napari-diffst {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from .io.safety import is_disk_full

        if not is_disk_full(exc):
            raise
        print(f"napari-diffst {args.command}: error: cannot write {exc.filename or 'the output'}: the disk is full "
              f"({exc.strerror}); writes are atomic, so earlier files are intact. Free some space and run again",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-diffst {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
