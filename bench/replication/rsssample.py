#!/usr/bin/env python3
"""Peak memory of a few processes over a phase (bigtx.sh).

    rsssample.py OUTFILE [--interval 0.1] NAME=PID...

Samples /proc/PID/status every interval until SIGTERM, then writes one line per NAME:
    NAME PID MAX_VMRSS_KB MAX_RSSANON_KB VMHWM_KB
VmRSS of a Postgres backend includes the shared buffers it touched; RssAnon excludes shared
memory. VmHWM is the kernel's peak RSS over the process's whole life (last value read).
A process that is gone reports what was seen before it went.
"""

import signal
import sys
import time


def read(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "VmHWM"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def main():
    outfile = sys.argv[1]
    args = sys.argv[2:]
    interval = 0.1
    if args[:1] == ["--interval"]:
        interval, args = float(args[1]), args[2:]
    procs = [a.split("=", 1) for a in args]
    peak = {name: [0, 0, 0] for name, _ in procs}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    def sample():
        for name, pid in procs:
            s = read(pid)
            p = peak[name]
            p[0] = max(p[0], s.get("VmRSS", 0))
            p[1] = max(p[1], s.get("RssAnon", 0))
            if "VmHWM" in s:
                p[2] = s["VmHWM"]

    with open(outfile + ".tmp", "w") as f:
        f.write("ready\n")
    while not stop:
        sample()
        time.sleep(interval)
    sample()
    with open(outfile, "w") as f:
        for name, pid in procs:
            f.write(f"{name} {pid} {' '.join(map(str, peak[name]))}\n")


if __name__ == "__main__":
    main()
