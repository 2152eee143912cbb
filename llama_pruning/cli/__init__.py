"""Command-line entry points."""

import argparse
import difflib
from collections.abc import Sequence


def _option_strings(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> list[str]:
    """The flags of `parser` and of the sub-command `namespace` chose, if any (argparse's own fields, since 3.2)."""
    options = list(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(namespace, action.dest, None))
            if chosen is not None:
                options += _option_strings(chosen, namespace)
    return options


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), like every other user error; a mistyped
    flag is answered with the nearest one the command has."""

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            options = _option_strings(self, namespace)
            near = [difflib.get_close_matches(extra.split("=")[0], options, n=1, cutoff=0.8)
                    for extra in extras if extra.startswith("--")]
            hint = next((f"; did you mean {match[0]}?" for match in near if match), "")
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (--help lists the options)\n")
