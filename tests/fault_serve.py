"""A test-only entry point: `wan_spmd`'s command line with one fault injected into the HTTP front.

    torchrun ... -m tests.fault_serve serve ...   (with WAN_SPMD_TEST_FAULT_PROMPT=PROMPT)

A `POST /v1/videos` whose prompt equals PROMPT fails with an unexpected exception during
validation, the path behind the server's JSON 500 that no client value reaches any more. The fault
lives here, not in the server: production code reads no test switch.
"""

from __future__ import annotations

import os
from typing import Any

from wan_spmd.server.routes import videos

FAULT_ENV = "WAN_SPMD_TEST_FAULT_PROMPT"
MESSAGE = "fault injected by tests.fault_serve (a test of the unexpected-error path)"


def install(prompt: str) -> None:
    """Make the videos routes' validation raise for `prompt` (every other request is validated as usual)."""
    validate = videos.resolve_params

    def resolve_params(fields: dict[str, Any], **kwargs: Any) -> Any:
        if fields.get("prompt") == prompt:
            raise RuntimeError(MESSAGE)
        return validate(fields, **kwargs)

    videos.resolve_params = resolve_params


if __name__ == "__main__":
    install(os.environ[FAULT_ENV])
    from wan_spmd.cli import main

    main()
