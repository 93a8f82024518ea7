"""The test harness's own cluster: a server that will not stop cleanly is stopped hard, so
that the tests after it still have a server, and the error quotes the server's log."""

from __future__ import annotations

import psycopg
import pytest

from pgstagechain.testing import TemporaryCluster


@pytest.mark.slow
def test_a_stop_that_fails_stops_the_server_hard_and_quotes_its_log() -> None:
    cluster = TemporaryCluster().start()
    try:
        # pg_ctl refuses a mode it does not know, as it gives up on a server that hangs
        with pytest.raises(RuntimeError, match="the server log ends with") as caught:
            cluster.stop("politely")
        assert "database system is ready to accept connections" in str(caught.value)
        assert not cluster.is_running()
        cluster.start()
        with pytest.raises(RuntimeError, match="the server log ends with"):
            cluster.restart("politely")
        assert cluster.is_running()  # restarted all the same
        with psycopg.connect(cluster.dsn(), connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        cluster.remove()
