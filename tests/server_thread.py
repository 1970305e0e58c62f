"""An app served by uvicorn in a thread of the test process, on a free port of this machine."""

import contextlib
import socket
import threading
import time

import uvicorn


@contextlib.contextmanager
def serving(app, timeout: float = 60.0):
    """Serve `app` on 127.0.0.1 while the block runs; yields its base URL (`http://127.0.0.1:PORT`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
