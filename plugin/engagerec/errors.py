"""engagerec's own error types above the data layer: what the CLI reports as a message (exit 2)
rather than a traceback. Bad input data is ``engagerec.data.errors.DataError`` (it carries the
file, column and row)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema: the message names the key,
    and the nearest valid key when it is unknown."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or written: damaged, truncated, incomplete, or from a
    run it cannot resume (another world size mid-epoch). The message names the file and why."""


class TrainingError(RuntimeError):
    """Training cannot go on, e.g. a loss became NaN or infinite: the message names the step,
    the task and the last good checkpoint."""
