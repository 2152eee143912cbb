"""Wall time and PPL of the README's main job, with and without `--fast`, on this machine.

    python -m bench.fast                 # both rows (the default one takes long on 2 CPU cores)
    python -m bench.fast --only fast     # the --fast row only

Each row runs the README's first command's `python global_pruning.py ...` part (read from README.md, so it is the
command users run) in a subprocess with a fresh run folder, packaged data only (LLAMA_PRUNING_DATA unset) and the
model cache already warm (the one-time GGUF conversion is not counted). The machine's load average before and
after each row and the run's CPU time (user + sys) are recorded with it, since other work on a 2-core machine
changes the wall time a lot.
Rows are appended to bench/results_fast.jsonl; bench/results_fast.md says what they mean.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_job() -> list[str]:
    """The arguments of `python global_pruning.py` in the README's first command block."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    job = block[block.index("python global_pruning.py"):].strip()
    return shlex.split(job)[2:]


def run_row(name: str, extra: list[str], threads: int | None) -> dict:
    """Run the README job (+ `extra`) once; wall time, PPL, load averages."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_PRUNING_DATA"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    from llama_pruning.models.loading import smollm2_hf_dir

    smollm2_hf_dir()  # the one-time conversion happens here, outside the timed run
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "global_pruning.py", *readme_job(), *extra, "--output_root", out]
        load_before = os.getloadavg()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_after = os.getloadavg()
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads((Path(out) / "global_pruning" / "metrics.json").read_text())
        tail = [line for line in proc.stdout.splitlines() if line.strip()][-3:]
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return {"name": name, "args": " ".join(readme_job() + extra), "wall_seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "wikitext2 PPL after pruning": metrics["wikitext2 PPL after pruning"],
            "pruning seconds": metrics["pruning seconds"], "params_after": metrics["params_after"],
            "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS"),
            "load_average_1_5_15_before": [round(x, 2) for x in load_before],
            "load_average_1_5_15_after": [round(x, 2) for x in load_after],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "last_lines": tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["fast", "default"], default=None, help="run one row only")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: torch's)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results_fast.jsonl")
    args = parser.parse_args(argv)
    rows = [("README main job --fast", ["--fast"]), ("README main job", [])]
    for name, extra in rows:
        if args.only and (args.only == "fast") != bool(extra):
            continue
        row = run_row(name, extra, args.threads)
        with args.results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{name}: {row['wall_seconds']:.0f} s, PPL {row['wikitext2 PPL after pruning']:.2f}, load "
              f"{row['load_average_1_5_15_before']} -> {row['load_average_1_5_15_after']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
