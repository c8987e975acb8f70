"""A TCP relay on loopback that a test can cut: the PostgreSQL tests take the database "down"
through it, the dashboard tests cut a browser's event stream."""

from __future__ import annotations

import socket
import threading
import time


class Relay:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target``.

    ``cut()`` ends every open connection; with ``refuse=True`` new ones are refused too until
    ``restore()`` (a database that is down), else they go through (a network blip).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.up = True
        #: How many times it was cut.
        self.cuts = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, *, refuse: bool = False) -> None:
        """End every connection through it (and with ``refuse``, refuse new ones)."""
        if refuse:
            self.up = False
        with self.lock:
            self.cuts += 1
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut(refuse=True)
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()
        self.thread.join(timeout=5)
        time.sleep(0.1)  # the pumps see their sockets shut and return
        with self.lock:
            for s in self.sockets:
                s.close()
