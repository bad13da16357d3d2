"""A local web page for a trained model: `fgvc/demo.py RUN_DIR [--port 7860]`.

Open the address it prints, choose or drop a photo, and see the top-5 classes with probabilities and,
for every map the model has (CAM, Grad-CAM, attention maps per stage, RA-CNN zoom boxes, DCN
saliency and patches), the map over the photo. RUN_DIR is a run folder or a folder made by
fgvc/export.py. The server listens on 127.0.0.1 only (this computer); Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python fgvc/NAME.py): see fgvc/_script.py
    import _script  # noqa: F401

from fgvc.errors import UserError, cli_main  # noqa: E402

DEFAULT_PORT = 7860
MAX_PORT = 65535  # TCP ports are 16-bit


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= MAX_PORT:
        raise UserError(f"--port is {args.port} but must be between 0 and {MAX_PORT}; e.g. --port {DEFAULT_PORT}, "
                        "or --port 0 for any free one.")

    # imported after parsing: `--help` and a wrong argument answer in 0.3 s, not after loading torch (5.6 s of CPU here)
    from fgvc.analysis.viewer import Viewer, serve
    from fgvc.engine.runs import load_run

    viewer = Viewer(load_run(args.run_dir))
    title = Path(args.run_dir).resolve().name
    try:
        serve(viewer, title, args.port, ready=lambda url: print(f"fgvc demo of {args.run_dir} ({viewer.family}: "
                                                                f"{', '.join(viewer.sources)}) at {url}", flush=True))
    except OSError as err:
        raise UserError(f"port {args.port} cannot be opened ({err.strerror}); choose another with --port, "
                        "or --port 0 for any free one.") from None
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
