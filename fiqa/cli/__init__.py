"""The `fiqa` command line."""

from __future__ import annotations

import argparse
import sys

from fiqa import console
from fiqa.cli import cluster, label, predict, run
from fiqa.cli.options import Parser, add_verbose, note_deprecated, version
from fiqa.cluster.submit import ClusterError
from fiqa.config import ConfigError
from fiqa.storage import StorageError

# The subcommands in the order `fiqa --help` lists them.
COMMANDS = (
    run.add_make_demo_data,
    run.add_shard,
    run.add_run,
    run.add_stage,
    label.add_label,
    run.add_models,
    run.add_status,
    predict.add_export,
    predict.add_predict,
    cluster.add_submit,
    cluster.add_jobs,
    cluster.add_stop,
)

# The commands that start or join Ray in this process: their console filters Ray's noise.
RAY_COMMANDS = {"run", "stage", "label"}
# What a user's paths cause: one line, exit 2 (other OSErrors, a full disk..., keep a traceback).
USER_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="fiqa",
        description=__doc__,
        epilog="`fiqa COMMAND --help` lists a command's options. Conventions: the model is "
        "the first argument, -o/--output is where results go, --set KEY=VALUE overrides "
        "a config key.",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug lines, and Ray's own output in full"
    )
    p.add_argument(
        "--version", action="version", version=f"fiqa {version()}", help="print the version"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    for s in sub.choices.values():
        add_verbose(s)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    note_deprecated(args.command, argv[argv.index(args.command) + 1 :])
    console.configure(args.verbose, starts_ray=args.command in RAY_COMMANDS)
    try:
        return args.func(args)
    except (ConfigError, ValueError, StorageError, ClusterError, *USER_OS_ERRORS) as e:
        print(f"fiqa: error: {error_text(e)}", file=sys.stderr)
        return 2


def error_text(e: Exception) -> str:
    """``e``'s message; an OS error's as ``PATH: what`` (not ``[Errno 17] File exists: ...``)."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        what = e.strerror[:1].lower() + e.strerror[1:]
        if e.filename2 is not None:
            return f"{e.filename} -> {e.filename2}: {what}"
        return f"{e.filename}: {what}"
    return str(e)
