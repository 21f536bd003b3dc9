"""Running a process's main coroutine: on uvloop where it is installed, with clean exits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


def run_async(main: Coroutine[Any, Any, None]) -> int:
    """Run `main` to completion; returns the process exit status.

    A listener that cannot bind (port taken, address not local) is the error operators meet
    most: it gets one clear line instead of a traceback.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(main)
    except OSError as error:
        log.error("cannot start: %s", error)
        return 2
    return 0
