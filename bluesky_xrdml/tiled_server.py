"""The embedded catalog's server process: tiled's own ``tiled serve``, started by
``catalog.embedded`` as ``python -m bluesky_xrdml.tiled_server serve config FILE ...``.

One change to tiled: table operations take turns. The embedded catalog keeps tables in
DuckDB (as tiled's ``SimpleTiledServer`` does: SQLite cannot hold the list columns that
TiledWriter files for small arrays), and tiled shares one DuckDB connection between the
server's threads. Two clients appending at once (a facility's TiledWriter and ours) then
failed ("No active transaction, cannot commit", HTTP 500) and once aborted the process
(``malloc_consolidate(): unaligned fastbin chunk``). Here every table connection is handed
out behind one lock and given back when tiled closes it, so the server does one table
operation at a time, whoever the clients are.
"""

from __future__ import annotations

import sys
import threading


class _Turn:
    """A table connection held for one operation: the lock is released on ``close()``."""

    def __init__(self, connection, lock):
        self._connection, self._lock, self._open = connection, lock, True

    def __getattr__(self, name):
        return getattr(self._connection, name)

    def close(self):
        if self._open:
            self._open = False
            try:
                self._connection.close()
            finally:
                self._lock.release()


def take_turns() -> None:
    """Hand out tiled's embedded (DuckDB/SQLite) table connections one at a time."""
    from tiled.storage import EmbeddedSQLStorage

    connect, lock = EmbeddedSQLStorage.connect, threading.RLock()

    def connect_in_turn(self):
        lock.acquire()
        try:
            return _Turn(connect(self), lock)
        except BaseException:
            lock.release()
            raise

    EmbeddedSQLStorage.connect = connect_in_turn


def main() -> None:
    take_turns()
    from tiled.commandline.main import main as tiled_main

    sys.argv[0] = "tiled"
    sys.exit(tiled_main())


if __name__ == "__main__":
    main()
