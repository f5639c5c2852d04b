"""Where the tracking store is and who may use it: the one rule for its URI, and the sentences for a server that
refuses the caller (MLflow's basic-auth app: 401 for a missing or wrong login, 403 for a missing permission), shared
by the tracker and the registry.

Credentials come from MLflow's own environment variables (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or
MLFLOW_TRACKING_TOKEN), which MLflow's client reads itself; ferdist never copies them into a config, a param, a tag, a
log line or a checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ferdist.config import TrackingConfig, redact_uri
from ferdist.errors import FerdistError

DEFAULT_URI = "sqlite:///mlflow.db"
"""The embedded store when nothing is configured: a SQLite file in the working directory."""


def tracking_uri(cfg: TrackingConfig) -> str:
    """The configured URI, else MLFLOW_TRACKING_URI, else a SQLite store in the working directory.

    Raises:
        FerdistError: a database store whose Python driver is not installed (see `check_database_driver`).
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    check_database_driver(uri)
    return uri


DATABASES = ("postgresql", "postgres", "mysql", "mssql")
"""The database stores MLflow's SQLAlchemy store takes besides SQLite (a scheme may name its driver: mysql+pymysql)."""


PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
            "pymssql": "pymssql", "pyodbc": "pyodbc", "pymysql": "pymysql"}
"""The pip package of each driver SQLAlchemy imports for these stores."""


def check_database_driver(uri: str) -> None:
    """One sentence, before anything runs, when ``uri`` is a database store whose driver is not installed: MLflow
    would stop with SQLAlchemy's ModuleNotFoundError traceback at the first call."""
    if uri.split("://", 1)[0].split("+", 1)[0].lower() not in DATABASES:
        return
    from sqlalchemy.engine.url import make_url

    try:
        dialect = make_url(uri).get_dialect()
        (dialect.import_dbapi if hasattr(dialect, "import_dbapi") else dialect.dbapi)()  # SQLAlchemy 1.4: dbapi
    except ModuleNotFoundError as exn:
        package = PACKAGES.get(str(exn.name), exn.name)
        raise FerdistError(f"the tracking store {redact_uri(uri)} needs the database driver '{exn.name}', which is "
                           f"not installed here; pip install {package}, or name an installed driver in the URI "
                           "(postgresql+psycopg2://, mysql+pymysql://)") from None
    except Exception as exn:  # noqa: BLE001 - SQLAlchemy's own refusal of a malformed URL or unknown driver
        said = redact_uri(str(exn).splitlines()[0][:160]) if str(exn).strip() else type(exn).__name__
        raise FerdistError(f"the tracking store {redact_uri(uri)} is not a database URL SQLAlchemy reads ({said}); "
                           "write it as postgresql://USER:PASSWORD@HOST/DB") from None


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute: Ray workers do not run in the driver's directory."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def missing_sqlite_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` store that does not exist yet, else None. Opening it would create an empty
    store, so a reader (a model to load) is told instead of leaving a new mlflow.db behind."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    name, _, query = uri[len(prefix) :].partition("?")
    if name in ("", ":memory:") or name.startswith("file:") or "uri=true" in query.lower():
        return None  # in memory, or SQLite's own URI form: not a plain file to look for
    return None if Path(name).exists() else Path(name)


def server_problem(uri: str) -> str | None:
    """Why an http(s) store does not answer its /health within 5 s (the exception's name), or None when it answers
    or is not a server. One request, no retries: MLflow's own client retries a refused connection for minutes."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as exn:
        return type(exn).__name__
    return None


def check_server(uri: str, *, fix: str) -> None:
    """An http(s) store answers its /health within 5 s, else one sentence ending with ``fix``."""
    if problem := server_problem(uri):
        raise FerdistError(f"cannot reach the MLflow tracking server at {redact_uri(uri)} ({problem}); {fix}")


def caller() -> str:
    """Who the requests are made as, for messages (never the secret itself)."""
    if user := os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return f"user '{user}'"
    return "the token in MLFLOW_TRACKING_TOKEN" if os.environ.get("MLFLOW_TRACKING_TOKEN") else "a caller with no login"


@contextmanager
def explained_refusal(uri: str, *, action: str, permission: str) -> Iterator[None]:
    """Runs the block; an MLflow 401 or 403 from it becomes one sentence: who was refused, and what to set (401) or
    which permission ``action`` needs (403: ``permission``, e.g. "EDIT on experiment 'x'")."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exn:
        status = exn.get_http_status_code() if exn.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED") else None
        where = f"the MLflow server at {redact_uri(uri)}"
        if status == 401:
            if not (os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_TRACKING_TOKEN")):
                raise FerdistError(f"{where} asks for a login and none was given; set MLFLOW_TRACKING_USERNAME and "
                                   "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account on it") from None
            raise FerdistError(
                f"{where} refused {caller()} (a wrong password, or no such account); check MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            ) from None
        if status == 403:
            raise FerdistError(f"{caller()} may not {action} on {where} (permission denied); ask its admin for "
                               f"{permission}") from None
        raise
