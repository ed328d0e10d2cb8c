"""Peak resident memory of a benchmark and every process it starts (Beam's SDK workers included).

Shared by the benchmark scripts; Linux only (reads /proc).
"""
import pathlib

# How often the memory sampler reads /proc: often enough to catch a worker's peak.
MEMORY_SAMPLE_SECONDS = 0.05


class MemorySampler:
    """Peak resident memory of this process plus all its descendants (Beam's worker processes),
    read from /proc in a background thread. (getrusage's ru_maxrss is no use here: Linux carries
    it across fork and exec, so a child would report its parent's peak.)"""

    def __init__(self):
        import os
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _descendants(self, pid):
        pids = [pid]
        for task in pathlib.Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                for child in task.read_text().split():
                    pids.extend(self._descendants(int(child)))
            except OSError:
                pass
        return pids

    def _rss(self):
        import os

        total = 0
        for pid in self._descendants(os.getpid()):
            try:
                total += int(pathlib.Path(f"/proc/{pid}/statm").read_text().split()[1]) * self.page
            except (OSError, IndexError, ValueError):
                pass
        return total

    def _run(self):
        while not self.done.wait(MEMORY_SAMPLE_SECONDS):
            self.peak = max(self.peak, self._rss())

    def stop(self):
        self.peak = max(self.peak, self._rss())
        self.done.set()
        self.thread.join()
        return self.peak
