"""The recipe console: what reaches the terminal, what only the run log keeps (a real process, real fds)."""

import os
import re
import subprocess
import sys
import textwrap

from cytoray.console import visible

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from cytoray import console
    from cytoray.console import run_recipe

    def main(argv):
        logging.basicConfig(level=logging.INFO)
        print("before the run dir is known")
        console.log_to(argv[0])
        console.say("ingest: 10 files -> 9 images kept")
        print("(RayTrainWorker pid=6832) [cytoray] step 25/60 loss 9.4221 [repeated 2x across cluster] (Ray ...)")
        print("(RayTrainWorker pid=6859) Reporting training result 2: TrainingReport(metrics={'loss': 9.4})")
        logging.getLogger("ray.data").info("Execution plan of Dataset x: InputDataBuffer[Input] -> ...")
        logging.getLogger("cytoray.x").warning("disk almost full: 1 GB left")
        warnings.warn("a real library warning")
        os.write(2, b"[2026-12-01 06:40:04,881 E 5723 5723] core_worker.cc:2465: Actor with class name: 'M' has "
                    b"constructor arguments in the object store and max_restarts > 0. If ...\\n")
        os.write(1, b"written by C code on fd 1\\n")
        progress = console.Progress("embed", total=4)
        for _ in range(4):
            progress.update(increment=1)
        progress.close()
        if len(argv) > 1:
            from cytoray.errors import UserError
            raise UserError("manifest m.parquet has no 'uri' column; add it")

    sys.exit(run_recipe(main))
""")


def _run(tmp_path, *args, env_extra=None):
    script = tmp_path / "recipe.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "CYTORAY_PROGRESS_S": "0", "PYTHONPATH": REPO, **(env_extra or {})}
    return subprocess.run([sys.executable, str(script), str(tmp_path / "run"), *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_terminal_shows_summaries_marked_lines_and_real_warnings_while_the_log_keeps_everything(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
    logs = list((tmp_path / "run" / "logs").glob("recipe_*.log"))
    assert len(logs) == 1
    assert len(out) == 7 and out[:2] == ["ingest: 10 files -> 9 images kept", "step 25/60 loss 9.4221"]
    assert out[6] == f"full log: {logs[0]}"
    assert [line.split(" (")[0] for line in out[2:6]] == [f"  embed: {i}/4 images" for i in range(1, 5)]
    assert len(err) == 2 and "disk almost full" in err[0] and "UserWarning: a real library warning" in err[1]
    log = logs[0].read_text()
    for line in ("before the run dir is known", "Reporting training result 2", "Execution plan of Dataset x",
                 "constructor arguments in the object store", "written by C code on fd 1", "disk almost full",
                 "ingest: 10 files -> 9 images kept", "[cytoray] step 25/60"):
        assert line in log, line


def test_user_errors_stay_one_line_and_verbose_shows_everything(tmp_path):
    proc = _run(tmp_path, "fail")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-2] == "cytoray: error: manifest m.parquet has no 'uri' column; add it"
    assert proc.stdout.splitlines()[-1].startswith("full log: ")
    proc = _run(tmp_path, env_extra={"CYTORAY_VERBOSE": "1"})
    assert "Reporting training result 2" in proc.stdout and "core_worker.cc" in proc.stderr


def test_line_filter():
    assert visible("\x1b[36m(TrainController pid=1)\x1b[0m Requesting resources".replace("\x1b[36m", "")
                   .replace("\x1b[0m", "")) is None
    assert visible("(run_validation_fn pid=7953) [cytoray] probe of step 20: eval linear 0.830") == \
        "probe of step 20: eval linear 0.830"
    assert visible("2026-12-01 06:40:04,840\tWARNING dataset.py:8601 -- Warning: The Ray cluster currently does "
                   "not have any available CPUs.") is None
    assert visible("2026-12-01 WARNING cytoray.curation.ingest: dataset x: 3 files unreadable") is not None
    assert visible("(RayTrainWorker pid=2) RuntimeError: CUDA out of memory") is not None
    assert visible("(RayTrainWorker pid=2) Checkpoint successfully created at: Checkpoint(...)") is None


def test_a_terminal_gets_a_progress_bar(tmp_path):
    """On a terminal (a pty, 100 columns) progress is a tqdm bar rather than lines."""
    import fcntl
    import pty
    import struct
    import termios
    import time

    script = tmp_path / "bar.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from cytoray import console

        def main(argv):
            progress = console.Progress("embed", total=50)
            for _ in range(50):
                time.sleep(0.01)
                progress.update(increment=1)
            progress.close()
            console.say("done")

        sys.exit(console.run_recipe(main))
    """))
    pid, fd = pty.fork()
    if pid == 0:  # the child waits for the window size, then runs the script on the pty
        time.sleep(0.3)
        os.environ["PYTHONPATH"] = REPO
        os.execv(sys.executable, [sys.executable, str(script)])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the pty
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode("utf-8", "replace")
    assert re.search(r"\rembed: +[1-9]\d*%\|.*\| [1-9]\d*/50 \[", text), text  # the bar moved
    assert "done\r\n" in text and "  embed: 50/50 images (" not in text  # a bar, not progress lines
