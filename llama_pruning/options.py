"""Choices and defaults the command line offers, importable without torch so that `--help` answers at once.

The modules that implement them (importance, selection, reconstruct, models.loading) import them from here.
"""

DEFAULT_MODEL = "smollm2-135m"
# placement: accelerate's device_map strategies
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# importance.unit / importance.layer
METHODS = ("taylor", "taylor_2nd", "wanda", "magnitude", "random", "obs")
GRADIENT_METHODS = ("taylor", "taylor_2nd", "obs")  # a loss decides their scores: --importance_ignore can leave tokens out
TAYLOR_2ND_VARIANTS = ("mix", "second", "sum")
DEFAULT_TAYLOR_2ND_VARIANT = "mix"
LAYER_METHODS = ("block_influence", "removal", "taylor")
OBS_CHUNKS = 128  # obs: greedy rounds per block at most (MLP channels go ~n/128 at a time, one low-rank update each)
# obs: the Fisher weights' labels, the model's own draws (the true Fisher, sampled) or the text's next tokens (empirical)
OBS_FISHERS = ("sampled", "labels")
DEFAULT_OBS_FISHER = "sampled"  # chosen on dev (docs/RESULTS_NOTES.md, twenty-first round)
# selection
NORMALIZATIONS = ("auto", "none", "layer")
STRATEGIES = ("inverse", "uniform")
# reconstruct
MODES = ("none", "bias", "lsq", "block")
DEFAULT_RIDGE = 3000.0  # the original weights count like this many calibration tokens (docs/RECONSTRUCTION.md)
DEFAULT_DRIFT = 0.5  # half-way between the block's own dense output and the dense model's stream (idem)
DEFAULT_BLOCK_EPOCHS = 4 / 3  # block: Adam passes per cut layer, 128 steps of 4 windows (dev: new windows beat repeated ones)
BLOCK_AUTOCAST = ("auto", "bf16", "none")  # block: its steps' and passes' matmuls in bf16 (auto: where native)
DEFAULT_BLOCK_LR = 2e-3  # block: peak Adam rate (cosine decay); chosen on dev (docs/RESULTS_NOTES.md)
DEFAULT_BLOCK_SPAN = 1  # block: consecutive cut layers refined jointly toward the dense output of the last
# block: the last layer's loss, toward a hidden state (mse) or the dense model's next-token distribution (kl)
LAST_LOSSES = ("auto", "mse", "kl")
DEFAULT_LAST_LOSS = "auto"  # kl where it applies (block with a dense stream); chosen on dev (docs/RESULTS_NOTES.md)
# block's kl: each of the last layer's steps reads the head on this fraction of its kept tokens (a fresh draw per step),
# and the layer takes 1 / fraction as many steps: the head's compute stays, the layer's steps double (dev: RESULTS_NOTES)
DEFAULT_KL_TOKENS = 0.5
KL_ROWS = 64  # block's kl: tokens per vocabulary-wide chunk (bounds its float32 temporaries; 128 runs no faster)
DEFAULT_SAMPLES = 256  # calibration windows of the solve: forward passes only, and more of them let it fit more
DEFAULT_BLOCK_SAMPLES = 384  # block's windows: the most whose projection keeps Llama-3-8B bf16 under 22 GB
# --reconstruct_ignore auto: wikitext-2's `<unk>` leave block's fit (dev P20 / P30 / P50: -1.4 / -1.7 / -3.3 %; lsq: worse)
AUTO_IGNORE = {"block": "<unk>"}
# models.gguf_export: types the gguf package writes, then llama.cpp's own k-quant mixtures (its quantizer)
GGUF_WRITER_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LLAMA_CPP_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
OUTTYPES = (*GGUF_WRITER_TYPES, *LLAMA_CPP_TYPES)
DEFAULT_OUTTYPE = "f16"  # the tensor type of --save_gguf and export-gguf files unless --outtype says otherwise


def resolve_ignore(value: str, mode: str) -> str | None:
    """The text whose calibration tokens leave the fit: `auto` -> AUTO_IGNORE of the mode (or none), `none` -> None."""
    if value == "auto":
        return AUTO_IGNORE.get(mode)
    return None if value == "none" else value


def resolve_last_loss(value: str, mode: str, drift: float) -> str:
    """The last layer's loss: `auto` -> `kl` where it applies (block, with a dense stream: drift > 0), else `mse`."""
    if value == "auto":
        return "kl" if mode == "block" and drift > 0 else "mse"
    return value


def reconstruct_windows(mode: str, requested: int | None, num_samples: int) -> int:
    """Calibration windows of a reconstruction: `requested`, else its mode's default (at least `num_samples`)."""
    return requested or max(DEFAULT_BLOCK_SAMPLES if mode == "block" else DEFAULT_SAMPLES, num_samples)
