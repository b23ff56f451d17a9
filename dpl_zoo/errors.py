"""Which errors are the user's to fix, in one place: the CLI shows them as one line and exits 2,
and a side-by-side run's process sends the same line to the parent (:mod:`dpl_zoo.side_by_side`),
so a run fails with the same words whether it ran alone or beside others."""
from __future__ import annotations

from typing import Optional


class UserError(RuntimeError):
    """A user error already turned into its line (e.g. in another process); shown as it is."""


class RunProcessError(RuntimeError):
    """A side-by-side run's process ended without a result (killed, e.g. out of memory); the
    message says which."""


def user_error_types() -> tuple[type, ...]:
    """Errors whose message says what to do (imported here, late: the CLI starts fast)."""
    from .cache import DownloadError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .datasets import DataError
    from .freeze import FreezeError
    from .integrity import IntegrityError
    from .layouts import ConversionError
    from .registry import ZooError
    from .train import TrainingDiverged
    return (ConfigError, DataError, CheckpointError, ConversionError, DownloadError, ZooError, TrainingDiverged,
            FreezeError, IntegrityError, FileExistsError, RunProcessError, UserError)


def user_error_line(error: BaseException) -> Optional[str]:
    """The one line a user sees for ``error``; None for an unexpected error (a bug: its traceback
    is shown). Hub and network errors are described also when they are the cause of another."""
    if isinstance(error, user_error_types()):
        return str(error)
    from .hub import describe_hub_error
    return describe_hub_error(error)
