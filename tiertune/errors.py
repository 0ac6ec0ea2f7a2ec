"""The one exception type for bad user input; the CLI turns it into one line and exit code 2.

A leaf module: the vocabulary modules (hardware, workload, schedule) may import it.
"""


class InputError(ValueError):
    """Bad input a user can fix: unknown preset, malformed file, infeasible budget."""
