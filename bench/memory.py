"""Peak memory of a benchmark and every process it starts (Beam's SDK workers included).

Shared by the benchmark scripts; Linux only (reads /proc).
"""
import os
import subprocess
import sys

# How often the memory sampler reads /proc: often enough to catch a worker's peak (a job's buffers
# live for seconds). Reading a process's PSS walks its page tables, about 7 ms per Beam process:
# every 0.2 s, the sampler took 3.5 CPU s of a 34-s two-worker `run` on 1M captions (5% of the two
# cores, which the single-process plain loop never feels: it leaves a core free), every 0.05 s 9%
# of an annotate job; every 0.5 s it takes 1.6 CPU s, and the peaks it finds are within their
# run-to-run spread (1,149 MiB here against 1,092-1,320 MiB at 0.2 s).
MEMORY_SAMPLE_SECONDS = 0.5

# The sampler is a process of its own, not a thread: a thread in the measured process would stop
# the jobs from forking their warm workers (pipeline/warm_workers.py only forks a single-threaded
# process), so the benchmark would measure a slower start than users get.
_SAMPLER = r"""
import os, pathlib, select, sys
root, period, me = int(sys.argv[1]), float(sys.argv[2]), os.getpid()

def descendants(pid):
    pids = [pid]
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            for child in task.read_text().split():
                pids.extend(descendants(int(child)))
        except OSError:
            pass
    return pids

def pss(pid):
    # proportional set size: pages a forked worker still shares with its parent count once in all
    try:
        for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0

peak = 0
while True:
    peak = max(peak, sum(pss(pid) for pid in descendants(root) if pid != me))
    if select.select([sys.stdin], [], [], period)[0]:
        break  # the benchmark closed our stdin: it is done
print(peak, flush=True)
"""


class MemorySampler:
    """Peak proportional set size (PSS) of this process plus all its descendants (Beam's worker
    processes), read from /proc by a sampler process every MEMORY_SAMPLE_SECONDS.

    PSS splits a page shared by several processes among them, so forked workers are not counted
    as full copies of their parent. (getrusage's ru_maxrss is no use here: Linux carries it across
    fork and exec, so a child would report its parent's peak.)"""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SAMPLER, str(os.getpid()), str(MEMORY_SAMPLE_SECONDS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def stop(self) -> int:
        """The peak in bytes."""
        output, _ = self.process.communicate("")
        return int(output.strip() or 0)
