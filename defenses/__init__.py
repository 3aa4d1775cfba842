"""Training-time defenses. Importing the package imports every module in it; defense modules
register themselves in ``DEFENSES``, shared stage machinery (losses, SimCLR, MixMatch) does not."""

import importlib
import pkgutil

from defenses.base import DEFENSES, DefenseContext, DefenseResult

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["DEFENSES", "DefenseContext", "DefenseResult"]
