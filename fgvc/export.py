"""Export a finished run: `fgvc/export.py RUN_DIR OUT_DIR [--push-to-hub REPO_ID [--private]]`.

Writes OUT_DIR in the Hugging Face Hub layout: model.safetensors, config.json (architecture, class
names, input size, mean/std; timm's pretrained_cfg for a plain classifier), recipe.yaml, README.md
(the model card) and the run's metrics. OUT_DIR must be new or empty. predict.py, evaluate.py,
localize.py and demo.py read OUT_DIR like a run folder; a plain classifier also loads with timm alone.
"""

from __future__ import annotations

import argparse
import sys

if __package__ in (None, ""):  # run as a file (python fgvc/NAME.py): see fgvc/_script.py
    import _script  # noqa: F401

from fgvc.errors import cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="also upload OUT_DIR to this Hugging Face Hub model repository (user/name)")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    args = parser.parse_args(argv)

    # imported after parsing: `--help` and a wrong argument answer in 0.3 s, not after loading torch (5.6 s of CPU here)
    from fgvc.analysis.share import export_run, push_to_hub

    out = export_run(args.run_dir, args.out_dir)
    print(f"written {out}: model.safetensors, config.json, recipe.yaml, README.md")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"uploaded to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
