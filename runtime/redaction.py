"""No log line shows the pod's secrets: the masking filter on every root handler, and the
driver's logging set-up (``$LLMTRAIN_LOG_LEVEL``).

The driver's log goes to the head, to S3, and its tail into the job's status and Events;
failure messages (the driver's, a tuning trial's) are masked the same way before they leave.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

LOG_LEVEL_ENV = "LLMTRAIN_LOG_LEVEL"
# What the pod's environment holds that no log line may show: botocore at DEBUG logs each
# request's headers, and its Authorization header names the access key id; anything may
# format an exception or an environment that carries one of these.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")
REDACTED = "<redacted>"


def redact(text: str, secrets: tuple[str, ...]) -> str:
    for s in secrets:
        text = text.replace(s, REDACTED)
    return text


class RedactSecrets(logging.Filter):
    """Masks the given values in every record a handler writes (message, arguments,
    traceback): the driver's log goes to the head, to S3, and its tail into the job's
    status and Events."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg, self.secrets)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


def secret_values(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The secret values in ``env`` long enough to mask without masking ordinary words."""
    env = os.environ if env is None else env
    return tuple(v for k in SECRET_ENV if len(v := env.get(k, "")) >= 8)


def configure_logging() -> None:
    """``$LLMTRAIN_LOG_LEVEL`` (e.g. DEBUG) on the root logger, and every root handler masks
    the pod's secrets (:data:`SECRET_ENV`), so no level shows them."""
    root = logging.getLogger()
    level = os.environ.get(LOG_LEVEL_ENV, "").upper()
    if level:
        root.setLevel(level)
    secrets = secret_values()
    for h in root.handlers:
        if not any(isinstance(f, RedactSecrets) for f in h.filters):
            h.addFilter(RedactSecrets(secrets))
