"""`python global_pruning.py ...`: the same as `llama-pruning global ...`."""

import sys

from llama_pruning.cli.main import main

if __name__ == "__main__":
    sys.exit(main(command="global"))
