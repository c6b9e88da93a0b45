"""The README's quickstart and walkthrough, run as written: every command of the walkthrough
block succeeds and leaves what it promises, and the quickstart run it trains reaches the
accuracy the README states. The block is read from README.md, so editing it changes the test."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^## Walkthrough\n.*?^```sh\n(.*?)^```", re.S | re.M)
CHAIN = ("train", "report", "export", "predict")  # what the walkthrough must take a reader through


def walkthrough_commands(readme: str) -> list[str]:
    """The command lines of README's walkthrough block (a trailing backslash continues a line)."""
    m = BLOCK.search(readme)
    assert m, "README.md needs a '## Walkthrough' section holding a ```sh block"
    lines = re.split(r"(?<!\\)\n", m.group(1))
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _cnnft_argv(line: str) -> list[str]:
    """The arguments after ``cnnft`` (comments dropped), or [] for another program."""
    argv = shlex.split(line, comments=True)
    return argv[1:] if argv and argv[0] == "cnnft" else []


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory) -> tuple[Path, list[tuple[str, subprocess.CompletedProcess]]]:
    """Runs the block in order, in a folder laid out like the repository (configs/ copied), with
    the installed entry point on PATH; stops at the first command that fails."""
    bindir = Path(sys.executable).parent
    if not (bindir / "cnnft").is_file():
        pytest.fail(f"no cnnft entry point beside {sys.executable}: install the package (pip install -e .)")
    cwd = tmp_path_factory.mktemp("walkthrough")
    shutil.copytree(REPO / "configs", cwd / "configs")
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = []
    for line in walkthrough_commands((REPO / "README.md").read_text()):
        proc = subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
        done.append((line, proc))
        if proc.returncode != 0:
            break
    return cwd, done


def _check_promise(argv: list[str], cwd: Path, stdout: str) -> None:
    """What README promises each cnnft command leaves behind."""
    cmd, args = argv[0], [a for a in argv[1:] if not a.startswith("-")]
    if cmd == "train":
        cfg = yaml.safe_load((cwd / args[0]).read_text())
        run = cwd / cfg["output_dir"] / cfg["name"]
        assert (run / "summary.json").is_file() and (run / "checkpoints" / "best.pt").is_file(), run
    elif cmd == "report":
        page = cwd / args[0] / "report" / "report.html"
        assert page.is_file() and "<html" in page.read_text(encoding="utf-8")[:2000].lower(), page
    elif cmd == "export":
        out = cwd / argv[argv.index("--out") + 1]
        assert out.is_file() and out.stat().st_size > 0, out
        assert json.loads(Path(f"{out}.json").read_text())["classes"], f"{out}.json names no classes"
    elif cmd == "predict":
        classes = json.loads((cwd / f"{args[0]}.json").read_text())["classes"]
        # the images: the arguments that are files (an option's value, like --top-k's 3, is not)
        images = [a for a in args[1:] if (cwd / a).is_file()]
        assert images, argv
        for image in images:
            # a table row: the image, its predicted class, the probability
            row = re.search(rf"{re.escape(image)}\W+(\S+)\W+([01]\.\d{{3}})", stdout)
            assert row and row.group(1) in classes, (image, classes, stdout)


@pytest.mark.real
@pytest.mark.slow
def test_walkthrough_runs_as_written(walkthrough):
    cwd, done = walkthrough
    commands = walkthrough_commands((REPO / "README.md").read_text())
    for line, proc in done:
        assert proc.returncode == 0, f"{line}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        if argv := _cnnft_argv(line):
            _check_promise(argv, cwd, proc.stdout)
    assert len(done) == len(commands)
    shown = [argv[0] for argv in map(_cnnft_argv, commands) if argv]
    assert all(c in shown for c in CHAIN) and shown.index("train") < shown.index("predict"), shown
    assert (cwd / "runs" / "quickstart" / "summary.json").is_file()  # the run folder the README names


@pytest.mark.real
@pytest.mark.slow
def test_quickstart_summary_matches_readme(walkthrough):
    stated = re.search(r"best validation accuracy of \*\*([0-9.]+)\*\*", (REPO / "README.md").read_text())
    assert stated, "README must state the quickstart's best validation accuracy"
    cwd, done = walkthrough
    assert done and _cnnft_argv(done[0][0])[:2] == ["train", "configs/quickstart.yaml"], "the walkthrough starts with the quickstart"
    assert done[0][1].returncode == 0, done[0][1].stderr[-3000:]
    summary = json.loads((cwd / "runs" / "quickstart" / "summary.json").read_text())
    print(f"quickstart: best val acc {summary['best_val_acc']:.4f}, {summary['wall_seconds']:.0f}s")
    assert summary["model"] == "efficientnet_lite0" and summary["weights"] == "DEFAULT"
    # the run is deterministic on one machine: README's figure (measured by benchmarks/quickstart.py
    # from a fresh clone) must match to within less than one of the 359 validation images
    assert summary["best_val_acc"] == pytest.approx(float(stated.group(1)), abs=1e-3)
