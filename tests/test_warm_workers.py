"""Warm workers (pipeline/warm_workers.py): local multi-process jobs run on workers forked from the
job's process, write what Beam's own workers write, relay their logs, fail loudly, and leave no
process behind.

The jobs run in a fresh interpreter, as a user's command does: the pool only forks a process with
no other thread and no torch, which a long pytest session cannot promise.
"""
import json
import os
import subprocess
import sys
import textwrap
import threading


from pipeline import annotate, warm_workers
from caption_rows import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def _python(script: str, *argv, timeout=240):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _captions(tmp_path, rows=3000):
    words = ["a man rides a bicycle", "a woman reads a book", "two dogs on a beach",
             "a nurse at work", "a doctor and a man"]
    return write_jsonl(tmp_path / "captions.jsonl",
                       [{"key": f"k{i:05d}", "caption": words[i % len(words)]}
                        for i in range(rows)])


def test_a_job_runs_on_the_pool_writes_what_one_process_writes_and_relays_worker_logs(tmp_path):
    table = _captions(tmp_path)
    result = _python("""
        import json, logging, sys
        logging.basicConfig(level=logging.WARNING)
        from pipeline import annotate, labelling, warm_workers

        label = labelling.LabelText.process
        def logged(self, samples):  # forked workers inherit this
            logging.getLogger("pipeline.labelling").warning("hello from a warm worker")
            return label(self, samples)
        labelling.LabelText.process = logged

        argv = ["--input", sys.argv[1], "--output", sys.argv[2], *sys.argv[3:]]
        with warm_workers.pool(sys.argv[3:]) as pool:
            forked = [pid for pid, _ in pool._idle]
            annotate.run(argv)
        print(json.dumps({"taken": pool.taken, "forked": forked}))
        """, str(table), str(tmp_path / "warm"), *TWO_WORKERS)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["taken"] == 2 and len(report["forked"]) == 2
    for pid in report["forked"]:  # every worker exited and was reaped
        assert not os.path.exists(f"/proc/{pid}")
    assert "hello from a warm worker" in result.stderr

    annotate.run(["--input", str(table), "--output", str(tmp_path / "one")])
    warm = annotate.read_annotations(tmp_path / "warm")
    one = annotate.read_annotations(tmp_path / "one")
    assert warm.num_rows == one.num_rows == 3000
    assert warm.equals(one)


def test_a_worker_that_fails_fails_the_job_and_no_process_is_left(tmp_path):
    table = _captions(tmp_path, rows=200)
    result = _python("""
        import json, sys
        from pipeline import annotate, labelling, warm_workers

        def broken(self, samples):
            raise RuntimeError("a DoFn failed in a warm worker")
        labelling.LabelText.process = broken

        with warm_workers.pool(sys.argv[3:]) as pool:
            print(json.dumps([pid for pid, _ in pool._idle]), flush=True)
            annotate.run(["--input", sys.argv[1], "--output", sys.argv[2], *sys.argv[3:]])
        """, str(table), str(tmp_path / "out"), *TWO_WORKERS, timeout=120)
    assert result.returncode != 0
    assert "a DoFn failed in a warm worker" in result.stderr
    for pid in json.loads(result.stdout.strip().splitlines()[0]):
        assert not os.path.exists(f"/proc/{pid}")


def test_idle_workers_exit_when_the_pool_closes():
    result = _python("""
        import json, sys
        from pipeline import warm_workers

        with warm_workers.pool(sys.argv[1:], jobs=2) as pool:
            pids = [pid for pid, _ in pool._idle]
            alive = [open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in pids]
        print(json.dumps({"pids": pids, "alive": alive, "after": warm_workers.active()}))
        """, *TWO_WORKERS, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["pids"]) == 4 and all(report["alive"])  # two workers for each of two jobs
    assert report["after"] is None
    for pid in report["pids"]:
        assert not os.path.exists(f"/proc/{pid}")


def test_which_jobs_get_a_pool():
    cores = os.cpu_count()
    assert warm_workers.local_workers_requested(TWO_WORKERS) == 2
    assert warm_workers.local_workers_requested(
        ["--direct_running_mode", "multi_processing", "--direct_num_workers", "0"]) == cores
    assert warm_workers.local_workers_requested(["--direct_running_mode=multi_processing"]) == 1
    assert warm_workers.local_workers_requested([]) == 0  # in-process: no workers to start
    assert warm_workers.local_workers_requested(
        ["--direct_running_mode=in_memory", "--direct_num_workers=2"]) == 0
    assert warm_workers.local_workers_requested(["--runner=PortableRunner", *TWO_WORKERS]) == 0
    assert warm_workers.local_workers_requested(
        ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
         "--direct_num_workers=x"]) == 0  # Beam refuses it with its own message


def test_no_fork_while_another_thread_runs():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not warm_workers.fork_is_safe()
        with warm_workers.pool(TWO_WORKERS) as pool:
            assert pool is None
    finally:
        stop.set()
        thread.join()
