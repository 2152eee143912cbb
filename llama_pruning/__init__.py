"""llama-pruning: GQA-aware structured pruning of LLaMA-family models.

Data flow: models (load) -> data (calibration) -> importance -> selection -> plan -> surgery
-> reconstruct -> recovery -> evaluation -> models.export (save).
"""

__version__ = "0.1.0"
