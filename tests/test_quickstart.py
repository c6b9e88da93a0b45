"""The README's quickstart: the offline config reaches the accuracy the README states."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.real
@pytest.mark.slow
def test_quickstart_json_summary_matches_readme(tmp_path):
    stated = re.search(r"best validation accuracy of \*\*([0-9.]+)\*\*", (REPO / "README.md").read_text())
    assert stated, "README must state the quickstart's best validation accuracy"
    proc = subprocess.run(
        [sys.executable, "-m", "cnnft", "train", str(REPO / "configs" / "quickstart.yaml"),
         f"output_dir={tmp_path}", "--json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    print(f"quickstart: best val acc {summary['best_val_acc']:.4f}, {summary['wall_seconds']:.0f}s")
    assert summary["model"] == "efficientnet_lite0" and summary["weights"] == "DEFAULT"
    # the run is deterministic on one machine: README's figure (measured by benchmarks/quickstart.py
    # from a fresh clone) must match to within less than one of the 359 validation images
    assert summary["best_val_acc"] == pytest.approx(float(stated.group(1)), abs=1e-3)
