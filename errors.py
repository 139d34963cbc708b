"""The one exception type for bad user input.

run.py catches it, prints its message as a single sentence and exits with
status 2, before any work is done. Raise it for anything the user can fix
(flags, dataset columns, checkpoints); let real bugs raise what they raise.
"""


class UsageError(Exception):
    """Bad input the user can fix; the message is shown as-is."""
