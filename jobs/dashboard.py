"""``python -m jobs.dashboard [--logdir outputs] [--port 6006]``: TensorBoard over every run,
bound to 127.0.0.1 unless ``--host`` says otherwise."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logdir", default="outputs", help="folder searched recursively for TensorBoard logs")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=6006)
    args = ap.parse_args(argv)
    from tensorboard import main as tensorboard_main

    sys.argv = ["tensorboard", "--logdir", args.logdir, "--host", args.host, "--port", str(args.port)]
    print(f"TensorBoard on http://{args.host}:{args.port}/ over {args.logdir}", flush=True)
    tensorboard_main.run_main()


if __name__ == "__main__":
    main()
