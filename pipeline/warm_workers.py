"""Local Beam workers forked from the job's own process, its imports already done.

In `--direct_running_mode=multi_processing` the FnApiRunner starts each job's SDK workers when the
job starts (`python -m apache_beam.runners.worker.sdk_worker_main`), and each worker spent about a
second of CPU importing Beam, pyarrow and this project before its first bundle while the driver
waited: on two cores, a 12,000-sample annotate job's first two seconds did one core's work. A job
(annotate, resample, or `run`'s two) instead enters `pool` before it starts any thread or gRPC
server, which forks the workers of each of its jobs at once: they wait as copies of a process that
has imported everything already, and `LocalRunner` hands them to the runner job by job.

A warm worker is Beam's own worker: it waits on a pipe for the environment the runner would have
given the subprocess (control and logging endpoints, pipeline options, worker id, working
directory), then runs `sdk_worker_main.main` as the subprocess does, in a fresh logging setup, and
exits after its one job. Its logs reach the driver through a logging server per worker, as the
subprocess's do. Where forking is not safe (not Linux, another thread running, torch imported: its
thread pools do not survive a fork) there is no pool, and Beam starts its workers itself.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading

# The environment the pool's workers serve; LocalRunner puts it in place of the subprocess one.
WARM_URN = "balancebeam:env:warm_subprocess_python:v1"
_pool: WarmWorkers | None = None


class WarmWorkers:
    """`count` forked worker processes, each waiting on a pipe for the one job it will serve."""

    def __init__(self, count: int):
        self.taken = 0  # workers handed to jobs (tests check the pool was used)
        self._idle: list[tuple[int, int]] = []  # (pid, write end of its pipe)
        self._lock = threading.Lock()
        for _ in range(count):
            self._idle.append(self._fork())

    def _fork(self) -> tuple[int, int]:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            os.close(write_end)
            for _, other in self._idle:  # so that each worker sees the end of its own pipe only
                os.close(other)
            _serve_one_job(read_end)
        os.close(read_end)
        return pid, write_end

    def take(self) -> tuple[int, int] | None:
        """A waiting worker (pid, pipe), or None when every one has been handed out."""
        with self._lock:
            if not self._idle:
                return None
            self.taken += 1
            return self._idle.pop(0)

    def close(self) -> None:
        """Workers that got no job are told so (their pipe closes) and exit."""
        with self._lock:
            idle, self._idle = self._idle, []
        for pid, write_end in idle:
            os.close(write_end)
            os.waitpid(pid, 0)


def local_workers_requested(beam_args) -> int:
    """How many workers a local multi-process job with these Beam arguments runs (0: it is not
    one, or not one LocalRunner runs)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import TO_LOCAL_RUNNER, local_worker_processes

    try:
        return local_worker_processes(PipelineOptions(list(beam_args)), TO_LOCAL_RUNNER)
    except SystemExit:  # a value Beam's parser refuses; the job says so with Beam's own message
        return 0


def fork_is_safe() -> bool:
    return (sys.platform.startswith("linux") and threading.active_count() == 1
            and "torch" not in sys.modules)


@contextlib.contextmanager
def pool(beam_args, jobs: int = 1):
    """Within it, the local multi-process jobs (at most `jobs`) take their workers from a pool
    forked on entry. Nothing happens when another pool is active (its jobs are part of the
    caller's), the jobs are not local multi-process ones, or forking is not safe here."""
    global _pool
    workers = local_workers_requested(beam_args)
    if _pool is not None or not workers or not fork_is_safe():
        yield _pool
        return
    _pool = WarmWorkers(workers * jobs)
    try:
        yield _pool
    finally:
        warm, _pool = _pool, None
        warm.close()


def active() -> WarmWorkers | None:
    return _pool


def use_pool(pipeline_proto) -> bool:
    """Point the proto's subprocess worker environments at the pool; False when there is none."""
    from apache_beam.portability import python_urns

    if _pool is None:
        return False
    _register_handler()
    for environment in pipeline_proto.components.environments.values():
        if environment.urn == python_urns.SUBPROCESS_SDK:
            environment.urn = WARM_URN  # the payload stays: Beam's worker command line
    return True


_registered = False


def _register_handler() -> None:
    """Teach the FnApiRunner to start WARM_URN workers from the pool (once per process)."""
    global _registered
    if _registered:
        return
    from apache_beam.runners.portability import local_job_service
    from apache_beam.runners.portability.fn_api_runner.worker_handlers import (
        SubprocessSdkWorkerHandler, WorkerHandler)

    @WorkerHandler.register_environment(WARM_URN, bytes)
    class WarmWorkerHandler(SubprocessSdkWorkerHandler):
        """Beam's subprocess worker handler; its worker comes from the pool while it has one."""

        def start_worker(self):
            worker = _pool.take() if _pool is not None else None
            if worker is None:  # more jobs than the command said: Beam's own subprocess
                self.worker = local_job_service.SubprocessSdkWorker(
                    self._worker_command_line, self.control_address, self.provision_info,
                    self.worker_id)
            else:
                self.worker = _WarmSdkWorker(worker, self.control_address, self.provision_info,
                                             self.worker_id)
            self.worker_thread = threading.Thread(name="run_worker", target=self.worker.run)
            self.worker_thread.start()

    _registered = True


class _WarmSdkWorker:
    """Beam's local_job_service.SubprocessSdkWorker, with a waiting fork in place of a new process.
    """

    def __init__(self, worker, control_address, provision_info, worker_id):
        (self.pid, self.pipe), self.control_address = worker, control_address
        self.provision_info, self.worker_id = provision_info, worker_id

    def run(self):
        import grpc
        from google.protobuf import json_format, text_format

        from apache_beam.portability.api import beam_fn_api_pb2_grpc, endpoints_pb2
        from apache_beam.runners.portability.local_job_service import BeamFnLoggingServicer
        from apache_beam.utils import thread_pool_executor

        logging_server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                                     options=[("grpc.http2.max_pings_without_data", 0),
                                              ("grpc.http2.max_ping_strikes", 0)])
        logging_port = logging_server.add_insecure_port("[::]:0")
        logging_server.start()
        beam_fn_api_pb2_grpc.add_BeamFnLoggingServicer_to_server(BeamFnLoggingServicer(),
                                                                 logging_server)
        environment = dict(
            os.environ,
            CONTROL_API_SERVICE_DESCRIPTOR=text_format.MessageToString(
                endpoints_pb2.ApiServiceDescriptor(url=self.control_address)),
            LOGGING_API_SERVICE_DESCRIPTOR=text_format.MessageToString(
                endpoints_pb2.ApiServiceDescriptor(url=f"localhost:{logging_port}")),
            PIPELINE_OPTIONS=json_format.MessageToJson(
                self.provision_info.provision_info.pipeline_options))
        if self.worker_id:
            environment["WORKER_ID"] = self.worker_id
        try:
            with os.fdopen(self.pipe, "wb") as pipe:
                pipe.write(json.dumps({"environment": environment, "cwd": os.getcwd()}).encode())
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code:
                raise RuntimeError(f"Worker subprocess exited with return code {code}")
        finally:
            logging_server.stop(0)


def _serve_one_job(read_end: int) -> None:
    """A forked worker: waits for its job, runs Beam's worker main in a fresh logging setup, exits
    without the parent's exit handlers."""
    code = 0
    try:
        with os.fdopen(read_end, "rb") as pipe:
            job = pipe.read()
        if job:
            job = json.loads(job)
            _fresh_logging()
            os.environ.clear()
            os.environ.update(job["environment"])
            os.chdir(job["cwd"])
            from apache_beam.runners.worker import sdk_worker_main

            sdk_worker_main.main(sys.argv)
    except KeyboardInterrupt:
        code = 130
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else 1
    except BaseException:  # pylint: disable=broad-except
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fresh_logging() -> None:
    """The logging of a new process: no handlers and no levels the parent command set."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            logger.setLevel(logging.NOTSET)
            logger.handlers.clear()
            logger.propagate = True
            logger.disabled = False
