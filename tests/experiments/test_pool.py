"""Worker processes of parallel suites: a run is never left training when its suite process is gone."""
import os
import signal
import subprocess
import sys
import textwrap
import time


def wait_for_sigterm(marker: str) -> str:
    """A stand-in for a training run: works until SIGTERM, then 'saves' (writes the marker) and returns."""
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    with open(marker + ".started", "w") as f:
        f.write(str(os.getpid()))
    while not stopped:
        time.sleep(0.05)
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    return "interrupted"


def test_workers_stop_like_sigterm_when_the_suite_process_is_killed(tmp_path):
    marker = str(tmp_path / "saved")
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_pool import wait_for_sigterm
        from hyperloop_lm.experiments.pool import run_parallel
        if __name__ == "__main__":
            for _ in run_parallel(wait_for_sigterm, [{marker!r}], 2, lambda m: True):
                pass
        """)])
    try:
        deadline = time.time() + 60
        while not os.path.exists(marker + ".started"):  # the worker is inside its run
            assert time.time() < deadline and parent.poll() is None, "the worker never started"
            time.sleep(0.1)
        parent.send_signal(signal.SIGKILL)  # the parent alone, not its group: nothing reaches the worker
        parent.wait()
        deadline = time.time() + 20
        while not os.path.exists(marker):
            assert time.time() < deadline, "the orphaned worker kept running"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
        if os.path.exists(marker + ".started") and not os.path.exists(marker):  # failed: leave no stray worker
            os.kill(int(open(marker + ".started").read()), signal.SIGKILL)
