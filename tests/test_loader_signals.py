"""Loader workers start with SIGTERM blocked, so a SIGTERM sent to the whole process group
(`timeout`, `kill -- -PGID`, Slurm) in the moment between a worker's fork and its own set-up
cannot kill it with the default action; the main process gets its mask back at once."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from cnnft.data import folders


class _Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.tensor([i])


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_workers_start_with_sigterm_blocked_and_the_main_process_keeps_its_mask(tmp_path: Path, monkeypatch):
    original = folders._worker_init

    def recording(worker_id: int) -> None:  # runs first thing in the worker, before its own policy
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
        (tmp_path / f"w{worker_id}").write_text(str(signal.SIGTERM in blocked))
        original(worker_id)

    monkeypatch.setattr(folders, "_worker_init", recording)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    loader = folders.make_loader(_Numbers(), 2, 2)
    assert sorted(int(x) for b in loader for x in b.flatten()) == [0, 1, 2, 3]
    assert [(tmp_path / f"w{i}").read_text() for i in range(2)] == ["True", "True"]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before, "the main process's mask is as it was"
