"""The CLI's one convention: the options every command spells the same way.

* The model is the first argument (``MODEL``: a checkpoint directory, its ``model.json`` or
  ``model.safetensors``, or an export), inputs follow it (``INPUT...``).
* ``-o/--output`` is where results go; ``--batch-size`` is images per model call.
* ``--set KEY=VALUE`` (repeatable) overrides a config key wherever a config applies; a
  command's own flags are shortcuts named after the keys they set (``--max-image-pixels``
  sets ``data.max_image_pixels``).
* ``--address`` is the Ray cluster; ``-v/--verbose`` is accepted before or after the command.
* Every option has a help line (tests/test_cli.py walks the parser to check).

Old spellings keep working as hidden aliases that print a deprecation note (`DEPRECATED`).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from typing import Any

# (command, old spelling) -> what to write instead; hidden from --help, noted on stderr when used.
DEPRECATED: dict[tuple[str, str], str] = {}

SET_HELP = "override a config key, e.g. %s (repeatable; YAML values)"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, without the deprecated spellings of an option."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "deprecated_aliases", ())
        if hidden:
            action = copy.copy(action)
            action.option_strings = [o for o in action.option_strings if o not in hidden]
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def command_name(s: argparse.ArgumentParser) -> str:
    return s.prog.split()[-1]


def option(
    s: argparse.ArgumentParser, *flags: str, deprecated: Sequence[str] = (), **kwargs: Any
) -> argparse.Action:
    """``s.add_argument(*flags, **kwargs)``, with old spellings in ``deprecated`` accepted
    as hidden aliases."""
    action = s.add_argument(*flags, *deprecated, **kwargs)
    action.deprecated_aliases = tuple(deprecated)  # type: ignore[attr-defined]
    for old in deprecated:
        DEPRECATED[(command_name(s), old)] = flags[-1]
    return action


def hidden_alias(s: argparse.ArgumentParser, old: str, instead: str, **kwargs: Any) -> None:
    """An old spelling with no counterpart option (a flag that became an argument)."""
    s.add_argument(old, help=argparse.SUPPRESS, **kwargs)
    DEPRECATED[(command_name(s), old)] = instead


def add_output(s: argparse.ArgumentParser, help: str, **kwargs: Any) -> None:
    option(s, "-o", "--output", deprecated=["--out"], help=help, **kwargs)


def add_set(s: argparse.ArgumentParser, example: str) -> None:
    s.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP % example
    )


def add_verbose(s: argparse.ArgumentParser) -> None:
    """``-v`` after the command as well as before it (SUPPRESS: absent, it keeps fiqa's)."""
    s.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug lines, and Ray's own output in full (its logs are always in Ray's log dir)",
    )


def note_deprecated(command: str, argv: Sequence[str]) -> None:
    """Print a note for each old spelling ``argv`` uses (after the command, before ``--``)."""
    for token in argv:
        if token == "--":
            break
        new = DEPRECATED.get((command, token.split("=", 1)[0]))
        if new:
            print(
                f"fiqa {command}: {token.split('=', 1)[0]} is deprecated; use {new}",
                file=sys.stderr,
            )


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("fiqa-pseudolabel")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown (not installed)"
