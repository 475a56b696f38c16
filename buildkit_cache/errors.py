"""Errors the core raises. Callers catch `BuilderError` and report it; nothing else should escape."""


class BuilderError(Exception):
    """A measurement or action on a builder failed; the message says what and why."""


class Unavailable(BuilderError):
    """The Docker daemon, the builder container or the buildkitd cannot be reached right now."""


class TimedOut(Unavailable):
    """A command or call did not end within its deadline (and was stopped)."""


class CommandFailed(BuilderError):
    """A command (buildctl, du, df) ran but exited non-zero."""

    def __init__(self, argv: list[str] | tuple[str, ...], exit_code: int, stderr: str):
        self.argv = tuple(argv)
        self.exit_code = exit_code
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"`{' '.join(argv[:3])}` exited {exit_code}: {tail}")


class ParseError(BuilderError, ValueError):
    """Output that does not have the shape we know."""
