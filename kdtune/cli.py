"""The `kdtune` command: what a user does outside a study script."""
from __future__ import annotations

import argparse
import sys
import time

from kdtune.errors import KdtuneError


def _serve(args) -> int:
    from kdtune.tracking import EmbeddedServer, ui_link

    server = EmbeddedServer(args.store, port=args.port).start()
    print(f"MLflow UI: {server.uri}  (store: {server.store_dir})")
    print("runs table of an experiment: add ?workflowType=machine_learning to its URL; Ctrl-C stops the server")
    try:
        while server.process and server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdtune", description="Knowledge-distillation studies on Ray + MLflow")
    commands = parser.add_subparsers(dest="command", required=True)
    mlflow = commands.add_parser("mlflow", help="the embedded MLflow tracking server")
    mlflow_commands = mlflow.add_subparsers(dest="mlflow_command", required=True)
    serve = mlflow_commands.add_parser("serve", help="serve the local store (.kdtune) on a loopback port")
    serve.add_argument("--store", default=".kdtune", help="folder holding mlflow.db and artifacts/")
    serve.add_argument("--port", type=int, default=5000)
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KdtuneError as error:
        print(f"kdtune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
