#!/usr/bin/env python3
"""CPU time (user + system, ms) used so far by two Postgres clusters and a set of processes.

    cpusample.py SENDER_POSTMASTER_PID RECEIVER_POSTMASTER_PID [PID,PID...]

Prints three numbers: sending cluster, receiving cluster, sum of the listed processes (missing
ones count 0). A cluster is its postmaster, including the CPU of children it has already reaped
(cutime/cstime), plus its live children: a walsender or apply worker that starts during a
measurement is counted whole, and one that exits during it is not lost. Differences of two
samples give the CPU a phase cost, a steadier figure than elapsed time on a shared machine.
"""

import os
import sys


def main():
    stats = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After "(comm)": state, ppid, ..., utime, stime, cutime, cstime at 11..14 (0-based).
        stats[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))

    def tree(pm):
        return sum(t for pid, (ppid, t) in stats.items() if pid == pm or ppid == pm)

    def own(pid):
        return stats.get(pid, (0, 0))[1]

    listed = sys.argv[3].split(",") if len(sys.argv) > 3 else []
    others = sum(own(int(p)) for p in listed if p and p != "0")
    hz = os.sysconf("SC_CLK_TCK")
    ticks = (tree(int(sys.argv[1])), tree(int(sys.argv[2])), others)
    print(*(round(t * 1000 / hz) for t in ticks))


if __name__ == "__main__":
    main()
