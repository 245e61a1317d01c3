"""How every numbered script ends: main() returns its metrics, and one error exit.

    if __name__ == "__main__":
        cli.run(main, parse_args)

`main(args, extra_tokens) -> dict` returns the metrics it recorded (its manifest's). Errors
that a user fixes by changing the command or the inputs (an unknown flag or config key, a
missing or corrupt file, a missing checkpoint, a model that cannot be found) are UsageError
(or FileNotFoundError): run() prints one line naming the flag or file and the fix, and exits
with 2, never a traceback. A job that ran and found a failure (reward unit tests failed,
a driver stage failed, training diverged) raises JobFailed: one line, exit 1. Anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys


class UsageError(ValueError):
    """Bad input: a flag, config key or value, input file or checkpoint. The message names it and the fix.
    A ValueError, so code that checks values keeps catching it."""


class JobFailed(Exception):
    """The job ran and its result is a failure; the message says what failed and where to look."""


EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def run(main, parse_args) -> None:
    """Parse the command line, run main(args, extra_tokens), exit with 0, 1 (JobFailed) or 2 (usage)."""
    try:
        args, extra = parse_args()
        main(args, extra)
    except (UsageError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except JobFailed as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(0)
