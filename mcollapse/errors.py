"""Errors a user can cause; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """A problem with names, paths, formats or overrides that the user can fix."""


class DataError(UserError):
    """A dataset directory is missing or does not have the expected layout."""


class MediaError(Exception):
    """One sample's audio or image could not be read; the sample is skipped and counted."""


class ChecksFailed(UserError):
    """Results disagree with expected values (experiment=verify); the command exits with status 1."""
