"""What a fresh clone gets from README's quickstart command: setup time, training time, accuracy.

    python benchmarks/quickstart.py [--repo PATH] [--keep] [--json]

Clones the repository (its committed HEAD; default: the one this script lives in) into a
temporary folder, then runs README's first command there step by step (the parts joined by
`&&`: venv, pip install, `cnnft train configs/quickstart.yaml`), timing each. Prints the setup
time, the training command's time, the run's own `wall_seconds` and its best validation
accuracy, the figures README states. The pip cache is whatever this machine has: pass
`--no-pip-cache` to download every package as a machine that never installed them would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_command(readme: str) -> list[str]:
    """The steps of README's first code block (the quickstart), split at `&&`."""
    block = re.search(r"```\n(.*?)\n```", readme, re.S)
    if block is None:
        raise SystemExit("README has no code block")
    return [step.strip() for step in block.group(1).strip().split("&&")]


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_step(step: str, cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one step. CPU time hardly changes when other jobs share
    the cores; wall time does, so both are reported."""
    t0, c0 = time.perf_counter(), _child_cpu()
    proc = subprocess.run(step, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, _child_cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"step failed ({proc.returncode}): {step}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(REPO), help="repository to clone (its committed HEAD)")
    ap.add_argument("--keep", action="store_true", help="keep the clone and print where it is")
    ap.add_argument("--no-pip-cache", action="store_true", help="install without pip's download cache")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    if args.no_pip_cache:
        env["PIP_NO_CACHE_DIR"] = "1"
    tmp = Path(tempfile.mkdtemp(prefix="cnnft-quickstart-"))
    clone = tmp / "cnnft"
    try:
        t0 = time.perf_counter()
        subprocess.run(["git", "clone", "--quiet", args.repo, str(clone)], check=True)
        clone_s = time.perf_counter() - t0
        steps = readme_command((clone / "README.md").read_text())
        load_before = os.getloadavg()[0]
        measured = [run_step(step, clone, env) for step in steps]
        times, cpus = [m[0] for m in measured], [m[1] for m in measured]
        load_after = os.getloadavg()[0]
        summaries = sorted((clone / "runs").glob("*/summary.json"))
        if len(summaries) != 1:
            raise SystemExit(f"expected one run folder under {clone / 'runs'}, found {len(summaries)}")
        summary = json.loads(summaries[0].read_text())
        torch_version = subprocess.run(
            [str(clone / ".venv" / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
            capture_output=True, text=True, env=env,
        ).stdout.strip()
        figures = {
            "best_val_acc": summary["best_val_acc"],
            "best_epoch": summary["best_epoch"],
            "epochs_completed": summary["epochs_completed"],
            "training_wall_seconds": round(summary["wall_seconds"], 1),
            "clone_seconds": round(clone_s, 1),
            "setup_seconds": round(sum(times[:-1]), 1),
            "train_command_seconds": round(times[-1], 1),
            "train_command_cpu_seconds": round(cpus[-1], 1),
            "total_seconds": round(clone_s + sum(times), 1),
            "steps": [{"command": s, "seconds": round(t, 1), "cpu_seconds": round(c, 1)}
                      for s, t, c in zip(steps, times, cpus)],
            "cpu_cores": os.cpu_count(),
            "load_average": [round(load_before, 2), round(load_after, 2)],  # > cores: others shared them
            "python": sys.version.split()[0],
            "torch": torch_version,
            "pip_cache": not args.no_pip_cache,
        }
    finally:
        if args.keep:
            print(f"clone kept in {clone}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for step in figures["steps"]:
        print(f"{step['seconds']:7.1f} s ({step['cpu_seconds']:.0f} CPU s)  {step['command']}")
    print(f"best val accuracy {figures['best_val_acc']:.4f} (epoch {figures['best_epoch']} of "
          f"{figures['epochs_completed']})")
    print(f"setup {figures['setup_seconds']:.0f} s, training command {figures['train_command_seconds']:.0f} s "
          f"(the run's own wall_seconds {figures['training_wall_seconds']:.0f} s), whole command "
          f"{figures['setup_seconds'] + figures['train_command_seconds']:.0f} s; clone {figures['clone_seconds']:.0f} s")
    print(f"{figures['cpu_cores']} CPU cores (load average {figures['load_average'][0]} before, "
          f"{figures['load_average'][1]} after: above the core count, other jobs shared them), Python {figures['python']}, torch {figures['torch']}, "
          f"pip cache {'used' if figures['pip_cache'] else 'off'}")


if __name__ == "__main__":
    main()
