"""The embedded catalog's server process: tiled's own ``tiled serve``, started by
``catalog.embedded`` as ``python -m bluesky_xrdml.tiled_server serve config FILE ...``.

One change to tiled: every connection to an SQLite table store waits up to 30 s for the
database lock instead of failing at once. SQLite has one writer at a time, and tiled
opens several connections to it; without a busy timeout two clients appending at the
same moment (a facility's TiledWriter and ours) got "database is locked" (HTTP 500) and
had to retry. The timeout is per connection (``PRAGMA busy_timeout``), so it is set on
each connection handed out.
"""

from __future__ import annotations

import sys

BUSY_TIMEOUT_MS = 30_000


def _patch_sqlite_storage() -> None:
    from tiled.storage import EmbeddedSQLStorage

    connect = EmbeddedSQLStorage.connect

    def connect_waiting(self):
        conn = connect(self)
        if self.dialect == "sqlite":
            with conn.cursor() as cursor:
                cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return conn

    EmbeddedSQLStorage.connect = connect_waiting


def main() -> None:
    _patch_sqlite_storage()
    from tiled.commandline.main import main as tiled_main

    sys.argv[0] = "tiled"
    sys.exit(tiled_main())


if __name__ == "__main__":
    main()
