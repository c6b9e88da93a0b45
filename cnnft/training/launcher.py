"""``python -m cnnft.training.launcher TORCHRUN-ARGS``: torchrun, minus its own error dump.

When a process of a ``cnnft train --nproc N`` job fails, it has already said why (one clear
message on stderr, exit 2 for bad input); torchrun would then add its Python traceback and
a ChildFailedError table that bury that message. This runs torchrun's own launcher and ends
with the failed process's exit code instead (128 + N for a process killed by signal N).
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> int:
    """Run torchrun with ``argv``; the exit code of the job's first failure (0: none)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # "failed (exitcode: 2) local_rank: 0", "Sending process ... closing signal": the
    # processes' own messages say it better
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as exc:
        code = exc.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code or 1
    except SignalException as exc:  # Ctrl-C / SIGTERM, already handed to every process
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
