"""A file answer that cannot lose its file halfway: opened before the answer starts, sent from the
open descriptor, so a DELETE (or expiry) racing the download leaves it whole or makes it a 404.
No torch."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from starlette.responses import FileResponse
from starlette.types import Receive, Scope, Send


class OpenedFileResponse(FileResponse):
    """Starlette's FileResponse (Content-Length, ETag, Range requests) of a file opened at once.

    The file is opened here, in the route: FileNotFoundError then is the route's to turn into 404.
    The answer reads it through /proc/self/fd/N, which reopens the same file even after it was
    unlinked, so an answer that has begun always ends whole. Linux only, as the server is.
    """

    def __init__(self, path: Path, **kwargs: Any) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            stat_result = os.fstat(self.fd)
            if not stat.S_ISREG(stat_result.st_mode):
                raise FileNotFoundError(f"{path.name} is not a regular file")
            super().__init__(f"/proc/self/fd/{self.fd}", stat_result=stat_result, **kwargs)
        except BaseException:
            os.close(self.fd)
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            os.close(self.fd)
