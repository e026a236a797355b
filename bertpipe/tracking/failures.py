"""What an MLflow failure means: a transient one (retry later) or a permanent refusal of that record.

MLflow reports both through `MlflowException`, so the HTTP status it carries decides: a SQLite store
maps "database is locked" to TEMPORARILY_UNAVAILABLE (503) and an invalid value to
INVALID_PARAMETER_VALUE (400); a server's answer arrives as a `RestException` with the server's
code; a connection that could not be made is wrapped as INTERNAL_ERROR (500). Anything raised
outside MLflow's own types is transient when it is an OS or database-driver error, else permanent
(retrying a TypeError cannot help).
"""

from __future__ import annotations

# 4xx statuses that mean "not now" rather than "never": timeout, conflict, too early, too many requests,
# client closed the request.
RETRYABLE_CLIENT_STATUS = frozenset({408, 409, 425, 429, 499})
_CONNECTION_TEXT = ("Max retries exceeded", "Connection refused", "Failed to establish", "Read timed out",
                    "Name or service not known", "Connection aborted", "Connection reset")


def is_transient(err: BaseException) -> bool:
    """Whether retrying the same call later may succeed (connection lost, timeout, 5xx, a locked database)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or status in RETRYABLE_CLIENT_STATUS or is_connection_failure(err)
    if isinstance(err, OSError):  # ConnectionError, TimeoutError and every requests exception
        return True
    return type(err).__name__ == "OperationalError"  # sqlite3's and SQLAlchemy's: database is locked


def is_connection_failure(err: BaseException) -> bool:
    """No connection could be made: MLflow's REST client wraps requests' errors, their text tells them apart."""
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    return any(s in str(err) for s in _CONNECTION_TEXT)


def first_line(err: BaseException) -> str:
    """The first line of an error's text (at most 200 characters), or its type name when it has none."""
    text = str(err).strip().splitlines()
    return text[0][:200] if text else err.__class__.__name__
