"""Errors a user can cause. The CLI turns each into one line on stderr and exit status 2."""


class ExitnasError(Exception):
    """Base class: a problem with the user's input, not a bug in exitnas."""


class ConfigError(ExitnasError):
    """An invalid search-space / config file; the message names the file and the field path."""

    def __init__(self, message: str, *, file: str | None = None, path: str = "") -> None:
        self.file, self.path, self.detail = file, path, message
        where = ": ".join(p for p in (file, path) if p)
        super().__init__(f"{where}: {message}" if where else message)


class ArchError(ExitnasError):
    """An architecture that does not parse or does not fit its search space."""


class DataError(ExitnasError):
    """A missing, empty or unreadable dataset."""


class CheckpointError(ExitnasError):
    """A missing, corrupt, truncated or foreign checkpoint / weights file."""


class TrainingError(ExitnasError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""


class BudgetError(ExitnasError):
    """A MACs budget that no architecture of the space can meet."""


class RunDirError(ExitnasError):
    """A run directory that is missing a step's outputs or belongs to another space."""
