"""`python layer_pruning.py ...`: the same as `llama-pruning layer ...`."""

import sys

from llama_pruning.cli.main import main

if __name__ == "__main__":
    sys.exit(main(command="layer"))
