"""The run folder's layout: every path in it, named once."""

from __future__ import annotations

from pathlib import Path


class RunDir:
    """Every path in a run folder, named once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def __fspath__(self) -> str:
        return str(self.root)

    config = property(lambda self: self.root / "config.yaml")
    freeze_plan = property(lambda self: self.root / "freeze_plan.json")
    metrics = property(lambda self: self.root / "metrics.csv")
    summary = property(lambda self: self.root / "summary.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    best = property(lambda self: self.root / "checkpoints" / "best.pt")
    last = property(lambda self: self.root / "checkpoints" / "last.pt")
    tensorboard = property(lambda self: self.root / "tensorboard")
    report = property(lambda self: self.root / "report")

    def eval_dir(self, name: str) -> Path:
        return self.root / "eval" / name

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> "RunDir | None":
        """The run folder holding checkpoint ``path`` (RUN/checkpoints/x.pt), if it is in one."""
        p = Path(path)
        return cls(p.parent.parent) if p.parent.name == "checkpoints" else None

