"""diffusers' and transformers' console output around the loads sdlora reports itself.

Both libraries share one logging API (`diffusers.utils.logging`, `transformers.utils.logging`):
a verbosity and a switch for their per-load progress bars ("Loading weights", one per model).
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def quiet(*loggings, warnings: bool = True):
    """No progress bars from the given libraries' logging modules for the block; with `warnings`
    off as well, errors only (for a call whose outcome sdlora checks and reports itself)."""
    saved = [(logging, logging.get_verbosity(), logging.is_progress_bar_enabled()) for logging in loggings]
    for logging in loggings:
        logging.disable_progress_bar()
        if not warnings:
            logging.set_verbosity_error()
    try:
        yield
    finally:
        for logging, verbosity, bars in saved:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
