#!/usr/bin/env python3
"""Hold N idle Postgres sessions open until stdin closes.

Each connection completes the startup exchange (trust authentication) and waits at
ReadyForQuery, which is what an idle application connection looks like to a proxy: the
memory measured while they are open is the cost of a session that does nothing.

Usage: idle_clients.py HOST PORT USER DATABASE COUNT
Prints "ready" on stdout once all COUNT sessions reached ReadyForQuery, then blocks until
stdin reaches EOF (or the process is killed). Exits 1 with a reason if a session fails.
"""

import socket
import struct
import sys
import time

STARTUP_TIMEOUT_S = 30.0


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection during startup")
        buf += chunk
    return bytes(buf)


def open_session(host, port, user, database):
    sock = socket.create_connection((host, port), timeout=STARTUP_TIMEOUT_S)
    params = b""
    for key, value in (("user", user), ("database", database),
                       ("application_name", "pgmm-bench-idle")):
        params += key.encode() + b"\0" + value.encode() + b"\0"
    params += b"\0"
    body = struct.pack("!I", 196608) + params
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    while True:
        tag = recv_exact(sock, 1)
        (length,) = struct.unpack("!I", recv_exact(sock, 4))
        payload = recv_exact(sock, length - 4)
        if tag == b"E":
            fields = [f for f in payload.split(b"\0") if f]
            msg = next((f[1:].decode(errors="replace") for f in fields if f[:1] == b"M"), "?")
            raise ConnectionError(f"server refused the session: {msg}")
        if tag == b"R":
            (code,) = struct.unpack("!I", payload[:4])
            if code != 0:
                raise ConnectionError(f"authentication method {code} requested; the bench needs trust")
        if tag == b"Z":
            sock.settimeout(None)
            return sock


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    host, port, user, database, count = sys.argv[1:]
    sessions = []
    deadline = time.monotonic() + 60
    try:
        for i in range(int(count)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {i} sessions opened within 60 s")
            sessions.append(open_session(host, int(port), user, database))
    except (OSError, ConnectionError, TimeoutError) as e:
        print(f"idle_clients: session {len(sessions) + 1}: {e}", file=sys.stderr)
        sys.exit(1)
    print("ready", flush=True)
    sys.stdin.read()
    for s in sessions:
        try:
            s.sendall(b"X\0\0\0\4")
            s.close()
        except OSError:
            pass


if __name__ == "__main__":
    main()
