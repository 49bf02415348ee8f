#!/usr/bin/env python3
"""Poll a receiving Postgres on one connection until a condition holds (bigtx.sh).

    bigpoll.py HOST PORT --sql 'SELECT exists(...)' [--interval 0.1] [--timeout 600]

Prints, flushed: "ready" once connected (the query has run once), then "done EPOCH POLLS" at the
first poll whose first column is 't', or "timeout" (exit 1). Reuses pgpoll.py's minimal client.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pgpoll import Conn  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port")
    ap.add_argument("--sql", required=True)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    conn = Conn(args.host, args.port)
    conn.query(args.sql)
    print("ready", flush=True)
    deadline = time.monotonic() + args.timeout
    polls = 0
    while True:
        (done,) = conn.query(args.sql)[0][:1]
        polls += 1
        if done == "t":
            print(f"done {time.time():.6f} {polls}", flush=True)
            return 0
        if time.monotonic() >= deadline:
            print("timeout", flush=True)
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
