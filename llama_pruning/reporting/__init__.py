"""Run folders, logs, description.txt, tables and plots shared by every command."""

from llama_pruning.reporting.plots import plot_pruning_strategy
from llama_pruning.reporting.run import RunDir, RunExistsError, write_description

__all__ = ["RunDir", "RunExistsError", "plot_pruning_strategy", "write_description"]
