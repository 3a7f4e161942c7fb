"""Errors a user can cause, and the exit status of each outcome; the CLI prints a user error as
one line, without a traceback."""

EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected error (with its traceback), or a sweep in which some job failed
EXIT_USER_ERROR = 2  # a bad override, config value, path or dataset: fix the command or the data
EXIT_CHECKS_FAILED = 3  # experiment=verify: results disagree with the expected values
EXIT_NOTHING_MEASURED = 4  # the run finished but produced no measurement (every probe skipped)
EXIT_INTERRUPTED = 130  # Ctrl-C: what finished is saved, and the same command resumes


class UserError(Exception):
    """A problem with names, paths, formats or overrides that the user can fix."""

    exit_code = EXIT_USER_ERROR


class DataError(UserError):
    """A dataset directory is missing or does not have the expected layout."""


class MediaError(Exception):
    """One sample's audio or image could not be read; the sample is skipped and counted."""


class ChecksFailed(UserError):
    """Results disagree with expected values (experiment=verify)."""

    exit_code = EXIT_CHECKS_FAILED


class NothingMeasured(UserError):
    """Every measurement of a run was skipped; its results (with the reasons) are still written."""

    exit_code = EXIT_NOTHING_MEASURED
