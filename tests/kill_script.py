"""What the kill -9 trials of the test suite run (tests/test_kill_resume.py, tests/test_starnet.py)."""

# Runs chemtwin's CLI after wrapping the model folder's save_file: the K-th checkpoint write
# stops half-way through the temporary file and the process kills itself with SIGKILL.
DIE_IN_CHECKPOINT = """
import os, signal, sys
import chemtwin.tagging.model_folder as model_folder
real, k, count = model_folder.save_file, int(sys.argv[1]), [0]
def save_file(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    if "checkpoint" in os.path.basename(str(path)):
        count[0] += 1
        if count[0] == k:
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
model_folder.save_file = save_file
from chemtwin.cli import main
sys.exit(main(sys.argv[2:]))
"""
