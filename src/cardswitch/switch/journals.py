"""Open a journal by its URL: SQLite (one switch process) or PostgreSQL (several).

``sqlite:///path`` (or ``""``: ``<data_dir>/journal.db``) opens the SQLite
``Journal``; ``postgresql://user@host:port/db[?schema=name]`` (or
``postgres://``) opens ``PgJournal``. Both have the same API, so callers
(the switch, ``cardswitch cutover``, settlement, reports) hold either.
asyncpg is imported only when a PostgreSQL journal is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from cardswitch.switch.journal import Journal, JournalError

if TYPE_CHECKING:
    from cardswitch.switch.journal_pg import PgJournal

__all__ = ["AnyJournal", "JournalError", "is_postgres_url", "open_journal"]

AnyJournal = Union[Journal, "PgJournal"]

_PG_SCHEMES = ("postgresql", "postgres")


def is_postgres_url(url: str) -> bool:
    """True for ``postgresql://`` and ``postgres://`` journal URLs."""
    return "://" in url and url.split(":", 1)[0].lower() in _PG_SCHEMES


def open_journal(url: str, data_dir: str, *, readonly: bool = False, **options: object) -> AnyJournal:
    """Open the journal ``url`` names; ``options`` go to that journal's ``open``.

    Raises ``JournalError`` (one class for both kinds) with a message naming
    the problem: bad URL, server down, not a journal, schema too new.
    """
    if is_postgres_url(url):
        from cardswitch.switch.journal_pg import PgJournal

        return PgJournal.open(url, data_dir, readonly=readonly, **options)  # type: ignore[arg-type]
    return Journal.open(url, data_dir, readonly=readonly, **options)  # type: ignore[arg-type]
