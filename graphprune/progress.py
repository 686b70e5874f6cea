"""Stage logging for long work (entry point: :func:`stage`): Dynamo traces, Inductor compiles, exports.

    with stage("compile the shallow variant"):
        fn = compile_inner(gm, examples, config)

logs ``graphprune: compile the shallow variant ...`` when the stage starts and ``... done in 41.2 s`` when it ends
(INFO, logger ``graphprune.progress``; the ``graphprune`` command shows these for its long commands).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

log = logging.getLogger("graphprune.progress")


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Log the start and the duration of a stage of work."""
    log.info("graphprune: %s ...", what)
    start = time.perf_counter()
    yield
    log.info("graphprune: %s done in %.1f s", what, time.perf_counter() - start)


__all__ = ["stage"]
