#!/usr/bin/env python3
"""Watch a receiving Postgres until a marker row has been applied, on one connection.

Spawning psql every 20 ms would cost a fork, a connection and a backend start per poll on the
machine that is busy applying, so this keeps one connection open and speaks just enough of the
frontend/backend protocol (trust auth, simple query) to poll. Python standard library only.

    pgpoll.py HOST PORT --base N --marker M [--interval 0.02] [--timeout 300]

HOST is an address or a Unix socket directory (starts with '/'). Prints, flushed:
    ready                     connected; start the clock and resume replication now
    first EPOCH               wall clock of the first poll that saw max(id) > N
    done EPOCH POLLS          wall clock of the first poll that saw row id = M
or  timeout MAXID             (exit 1) the marker did not arrive within --timeout seconds
Wall clock (time.time()) so that the shell can compare it with $EPOCHREALTIME.
"""

import argparse
import socket
import struct
import sys
import time


class PgError(Exception):
    pass


class Conn:
    def __init__(self, host, port, user="postgres", database="postgres"):
        if host.startswith("/"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(f"{host}/.s.PGSQL.{port}")
        else:
            self.sock = socket.create_connection((host, int(port)))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        params = b""
        for k, v in (("user", user), ("database", database), ("application_name", "pgmm-bench-poll")):
            params += k.encode() + b"\0" + v.encode() + b"\0"
        body = struct.pack("!i", 196608) + params + b"\0"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        while True:
            tag, payload = self._read()
            if tag == b"R":
                (code,) = struct.unpack("!i", payload[:4])
                if code != 0:
                    raise PgError(f"server asks for authentication method {code}; use trust")
            elif tag == b"E":
                raise PgError(self._error(payload))
            elif tag == b"Z":
                return

    def _recv(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise PgError("server closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _read(self):
        tag = self._recv(1)
        (length,) = struct.unpack("!i", self._recv(4))
        return tag, self._recv(length - 4)

    @staticmethod
    def _error(payload):
        fields = {}
        for part in payload.split(b"\0"):
            if part:
                fields[part[:1]] = part[1:].decode(errors="replace")
        return f"{fields.get(b'S', 'ERROR')}: {fields.get(b'M', '?')}"

    def query(self, sql):
        """Rows of the last result, each a list of str or None."""
        body = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", len(body) + 4) + body)
        rows, error = [], None
        while True:
            tag, payload = self._read()
            if tag == b"D":
                (n,) = struct.unpack("!h", payload[:2])
                pos, row = 2, []
                for _ in range(n):
                    (ln,) = struct.unpack("!i", payload[pos : pos + 4])
                    pos += 4
                    if ln < 0:
                        row.append(None)
                    else:
                        row.append(payload[pos : pos + ln].decode())
                        pos += ln
                rows.append(row)
            elif tag == b"T":
                rows = []
            elif tag == b"E":
                error = self._error(payload)
            elif tag == b"Z":
                if error:
                    raise PgError(error)
                return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port")
    ap.add_argument("--base", type=int, required=True)
    ap.add_argument("--marker", type=int, required=True)
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()

    conn = Conn(args.host, args.port)
    sql = (
        "SELECT coalesce((SELECT max(id) FROM bench), 0), "
        f"EXISTS (SELECT 1 FROM bench WHERE id = {args.marker})"
    )
    conn.query(sql)  # plan and warm the cache before the clock starts
    print("ready", flush=True)
    deadline = time.monotonic() + args.timeout
    first_seen = False
    polls = 0
    max_id = 0
    while True:
        max_id, done = conn.query(sql)[0]
        now = time.time()
        polls += 1
        if not first_seen and int(max_id) > args.base:
            first_seen = True
            print(f"first {now:.6f}", flush=True)
        if done == "t":
            if not first_seen:
                print(f"first {now:.6f}", flush=True)
            print(f"done {now:.6f} {polls}", flush=True)
            return 0
        if time.monotonic() >= deadline:
            print(f"timeout {max_id}", flush=True)
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
