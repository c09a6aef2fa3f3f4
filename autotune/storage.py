"""Where studies live: SQLite in the user's cache by default, PostgreSQL, or an Optuna journal
file. A file that is not a valid study is refused with one line and left byte for byte as it
was: nothing is created in a foreign SQLite database and nothing is appended to a journal whose
last record is incomplete."""

from __future__ import annotations

import json
import sqlite3
import warnings
from pathlib import Path

import optuna

from sparvar.errors import SparvarError

__all__ = ["default_storage_url", "open_storage", "create_study"]

# Tables an Optuna RDB storage holds; a database with tables but none of these is someone else's.
_OPTUNA_TABLES = {"studies", "trials", "version_info"}


def default_storage_url() -> str:
    import platformdirs

    path = Path(platformdirs.user_cache_dir("sparvar")) / "studies.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _first_line(e: BaseException) -> str:
    return (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]


def _check_journal(path: Path, url: str) -> None:
    """Refuse a file that is not a complete Optuna journal before Optuna appends to it."""
    if not path.exists():
        return
    if not path.is_file():
        raise SparvarError(f"study storage {url} is not a file")
    data = path.read_bytes()
    if not data:
        return
    if not data.endswith(b"\n"):
        raise SparvarError(f"study storage {url}: its last record is incomplete (no newline at the end: "
                           "a writer was interrupted?); the file was left as it is")
    for n, line in enumerate(data.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "op_code" not in record:
            raise SparvarError(f"study storage {url} is not an Optuna journal (line {n} is not an Optuna "
                               "record); the file was left as it is")


def _check_sqlite(url: str) -> None:
    """Refuse an existing SQLite file that is not a database, or a database without Optuna's
    tables, before Optuna creates its schema in it."""
    path = Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        if "locked" in str(e):
            return  # RDBStorage waits for the lock and reports it
        raise SparvarError(f"study storage {url} cannot be opened: {e}; the file was left as it is") from None
    if tables and not tables & _OPTUNA_TABLES:
        raise SparvarError(f"study storage {url} is an SQLite database without Optuna's tables "
                           f"(it has {sorted(tables)[:5]}); the file was left as it is")


def open_storage(url: str | None, lock_timeout: float = 30.0, check: bool = True):
    """An Optuna storage for ``url``: ``sqlite:///...``, ``postgresql://...``, or ``journal:PATH``.

    A locked, corrupt or foreign storage raises ``SparvarError`` naming it; nothing in it is
    changed. ``check=False`` skips the file checks: worker processes of a run the parent checked
    open a journal that other workers may be appending to.
    """
    import sqlalchemy.exc

    url = url or default_storage_url()
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url[len("journal:"):])
            if check:
                _check_journal(path, url)
            return JournalStorage(JournalFileBackend(str(path)))
        if check:
            _check_sqlite(url)
        engine = {"connect_args": {"timeout": lock_timeout}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=60, grace_period=180)
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise SparvarError(f"study storage {url} cannot be opened: {_first_line(e)}") from None
    except ImportError as e:
        raise SparvarError(f"study storage {url} needs a database driver: {_first_line(e)} "
                           "(for PostgreSQL: pip install 'sparvar[postgres]')") from None
    except (ValueError, OSError, RuntimeError, KeyError, AssertionError) as e:
        raise SparvarError(f"study storage {url} cannot be opened: {_first_line(e)}") from None


def create_study(name: str, storage, url: str, **kwargs) -> optuna.Study:
    """Create or load study ``name``; ``SparvarError`` when the storage cannot hold it."""
    import sqlalchemy.exc

    try:
        return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, **kwargs)
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise SparvarError(f"study storage {url} cannot be used: {_first_line(e)}") from None
    except (ValueError, KeyError, AssertionError) as e:
        raise SparvarError(f"study storage {url} is not a readable Optuna study (corrupt?): {_first_line(e)}") from None
