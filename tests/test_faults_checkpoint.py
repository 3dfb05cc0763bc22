"""Checkpoint writer processes die with a SIGKILLed saver; nothing megatron-core starts lingers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

from faults import descendants, tool_env, wait_gone

# Inside owned_writer_processes(), exactly as during a save: megatron-core's results queue is in
# place (our Manager), and a writer is forked the way FileSystemWriterAsync forks its writers.
SAVER = textwrap.dedent(
    """
    import json, multiprocessing as mp, sys, time
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    from megatron_cpt.training.writer_processes import owned_writer_processes

    with owned_writer_processes():
        queue = fa._get_write_results_queue()
        writer = mp.get_context("fork").Process(target=time.sleep, args=(3600,))
        writer.start()
        queue.put("result")
        assert queue.get() == "result"
        print(json.dumps({"writer": writer.pid}), flush=True)
        time.sleep(3600)  # killed here, mid-save
    """
)


def test_sigkilled_saver_takes_manager_and_writers(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER], stdout=subprocess.PIPE, text=True, env=tool_env()
    )
    line = proc.stdout.readline()
    assert line, "saver script ended early"
    writer = json.loads(line)["writer"]
    children = descendants(proc.pid)
    assert writer in {p.pid for p in children}
    assert len(children) >= 2, children  # the writer and the results-queue Manager
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert wait_gone(children) == [], "a checkpoint process outlived its SIGKILLed saver"


def test_save_leaves_no_process_and_a_later_save_works():
    """After a save nothing of megatron-core's writer machinery is left, and saving again works."""
    script = textwrap.dedent(
        """
        import psutil
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
        from megatron_cpt.training.writer_processes import owned_writer_processes

        for _ in range(2):
            with owned_writer_processes():
                q = fa._get_write_results_queue()
                q.put(1)
                assert q.get() == 1
            assert fa._results_queue is None
            print(len([p for p in psutil.Process().children(recursive=True)
                       if p.status() != psutil.STATUS_ZOMBIE]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=tool_env(), timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0"]
