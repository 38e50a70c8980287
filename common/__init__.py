"""What the three scripts share (see each module's docstring)."""


class RunError(ValueError):
    """A run cannot start or go on for a reason its user can fix: a flag, a file, a run folder, a full disk, a loss
    that stopped being finite. The message is one line that names the flag or file and the fix; the scripts print it
    (`runlog.one_line_errors`) instead of a traceback and exit with status 2."""
