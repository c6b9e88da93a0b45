"""The errors cnnft raises on purpose.

Every error a user can cause is a :class:`CnnftError`; the CLI maps it to a message and
an exit code in one place. Anything else is a bug and exits 1 (with a traceback under
``--debug``).
"""

from __future__ import annotations


class CnnftError(Exception):
    """Base class: a problem with a message that says what to do next."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class InputError(CnnftError):
    """Bad input from the user (arguments, files, values): exit code 2."""

    exit_code = 2


class ConfigError(InputError):
    """The experiment config is invalid; ``problems`` lists every issue found."""

    def __init__(self, problems: list[str] | str, *, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        head = f"invalid config{where}: {len(self.problems)} problem(s)"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


class DataError(InputError):
    """The dataset cannot be used as given (missing folder, no images, class mismatch...)."""


class CheckpointError(InputError):
    """A checkpoint or weights file is missing, corrupt, unsafe or does not fit the model."""


class NoSpaceError(InputError):
    """The disk (or the user's quota) is full: nothing is wrong with the run, only with where it
    is written. ``needed`` is the size of the file that could not be written, in bytes."""

    def __init__(self, message: str, *, needed: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.needed = needed


class WeightsUnavailableError(InputError):
    """Pretrained weights must be downloaded but cannot be (offline, blocked)."""


class TrainingFailed(CnnftError):
    """Training stopped on a numerical fault (NaN/inf loss); progress so far is kept."""

    exit_code = 1


class Interrupted(CnnftError):
    """Training was stopped by SIGINT/SIGTERM after saving a resumable checkpoint."""

    def __init__(self, message: str, *, signum: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM
