"""`llama-pruning {global,layer,eval,export-gguf}`: one entry point; user errors print one line, never a traceback."""

from __future__ import annotations

import argparse
import sys

from llama_pruning.cli import OneLineParser, eval_cmd, gguf_cmd, global_cmd, layer_cmd

COMMANDS = {
    "global": (global_cmd, "global pruning: every unit in one table, importance/cost knapsack"),
    "layer": (layer_cmd, "layer-wise pruning: per-layer ratios from layer importance"),
    "eval": (eval_cmd, "parameters, MACs, speed and memory of a saved model next to its dense base"),
    "export-gguf": (gguf_cmd, "write a saved (pruned) model as a GGUF file for llama.cpp / Ollama"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` states every default, except flags that are off by default and help texts that explain theirs."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of one command (for the root scripts) or of all of them as sub-commands."""
    if command is not None:
        module, help_text = COMMANDS[command]
        parser = OneLineParser(description=help_text, formatter_class=HelpFormatter)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
        return parser
    parser = OneLineParser(prog="llama-pruning", description="GQA-aware structured pruning of Llama models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
