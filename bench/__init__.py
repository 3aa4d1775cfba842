"""backdoor-bench: training-time backdoor defenses, measured side by side."""

__version__ = "0.1.0"
