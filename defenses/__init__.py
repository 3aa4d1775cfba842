"""Training-time defenses. Importing the package registers every defense in ``DEFENSES``."""

from defenses import none  # noqa: F401  (registration side effects)
from defenses.base import DEFENSES, DefenseContext, DefenseResult

__all__ = ["DEFENSES", "DefenseContext", "DefenseResult"]
