"""`preflab serve` on a port another server holds: refused by name before the store is touched, so the
first admin's credentials are not printed for a server that never ran."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from preflab.cli import app


def test_serve_on_a_port_in_use_says_so_and_creates_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--db", f"sqlite:///{tmp_path / 'store.db'}", "--port", str(port)],
                               terminal_width=300)
    assert r.exit_code == 2, r.output
    assert f"--port: cannot listen on 127.0.0.1:{port}" in " ".join(r.output.split())
    assert "admin password" not in r.output and not (tmp_path / "store.db").exists()
