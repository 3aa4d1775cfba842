"""Attack zoo. Importing the package registers every attack in ``ATTACKS``."""

from attacks import badnets, blended  # noqa: F401  (registration side effects)
from attacks.base import ATTACKS, Attack

__all__ = ["ATTACKS", "Attack"]
