"""A reverse target that records whatever reaches it. The gateway routes every request
itself, so a test that points `--mode reverse:` here asserts it receives nothing."""

import socket
import threading


class RecordingTarget:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []  # one entry per connection: the bytes it brought
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "RecordingTarget":
        self._thread.start()
        return self

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(1)
            data = b""
            try:
                data = conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\nREVERSE TARGET")
            except OSError:
                pass
            self.received.append(data or b"(connected)")
            conn.close()

    def stop(self) -> None:
        self.sock.close()
