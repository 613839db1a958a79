"""Errors of the model package that a user can fix (a wrong file, a sampler the checkpoint cannot run)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, does not fit the model, or cannot do what was asked; the message says why."""
