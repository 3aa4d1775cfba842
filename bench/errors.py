"""Errors that stand for bad input. The CLI prints them as one line and exits 2."""


class BenchError(RuntimeError):
    """Bad input a user can fix; the message says how. Nothing is written when raised early."""


class ConfigError(BenchError, ValueError):
    """An unknown name, an impossible value or an unknown key in the configuration."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss; recorded as a failed row, never as a result."""
