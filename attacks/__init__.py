"""Attack zoo. Importing the package imports every module in it, which registers each attack
in ``ATTACKS`` (one file per attack, named as its registry key)."""

import importlib
import pkgutil

from attacks.base import ATTACKS, Attack

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ATTACKS", "Attack"]
