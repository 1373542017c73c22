"""Log set-up for the command line: readable text, or one JSON object a line."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

# What a client gets wrong in the HTTP itself, such as broken framing, a body
# that fails to inflate or a connection dropped mid-request: aiohttp answers 400
# (where it still can) and logs a traceback at ERROR.
CLIENT_FAULTS = (HttpProcessingError, RequestPayloadError, ConnectionResetError)


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class ClientFaults(logging.Filter):
    """Log a request the client got wrong as one warning line, without a traceback.

    The traceback says nothing an operator can act on, and anyone could fill
    the log with them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fault = record.exc_info[1] if record.exc_info else None
        if isinstance(fault, CLIENT_FAULTS):
            record.msg = f"{record.getMessage()}: {type(fault).__name__}"
            record.args = ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def configure(level: str, form: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(ClientFaults())
    if form == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log writes a line per request: noise at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
