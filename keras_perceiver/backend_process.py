"""Run a job in a fresh Python process under a chosen Keras backend.

Keras fixes its backend when it is first imported, so work for another backend (an export
route's converter, each backend of a benchmark) runs as `python -m module ...` with
KERAS_BACKEND set: `run_under_backend`.
"""

import os
import subprocess
import sys
import threading


def run_under_backend(module, arguments, backend, capture=False, pass_through_prefix=None):
    """Run `python -m module *arguments` with KERAS_BACKEND=`backend` (TensorFlow's C++ logs
    off) and return its `subprocess.CompletedProcess`; the caller reads its `returncode`.

    capture: collect its stdout and stderr as text (`.stdout`, `.stderr`) instead of letting
    them stream to this process's own. pass_through_prefix (with capture): stderr lines that
    start with it are also written, without it, to this process's stderr as they come (a long
    job's progress); `.stderr` keeps every line.
    """
    command = [sys.executable, "-m", module, *arguments]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if not capture:
        return subprocess.run(command, env=env)
    stdout, stderr = [], []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            # stdout is drained aside: a full stdout pipe would otherwise block the process
            # while its stderr is read line by line here
            reader = threading.Thread(target=lambda: stdout.append(process.stdout.read()))
            reader.start()
            for line in process.stderr:
                stderr.append(line)
                if pass_through_prefix is not None and line.startswith(pass_through_prefix):
                    sys.stderr.write(line[len(pass_through_prefix):])
                    sys.stderr.flush()
            reader.join()
        except BaseException:  # as subprocess.run does: an interrupted caller leaves no process behind
            process.kill()
            raise
    return subprocess.CompletedProcess(command, process.returncode, "".join(stdout), "".join(stderr))
