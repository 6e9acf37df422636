# Tests run on CPU. The Triton kernel runs through Triton's interpreter, which must be switched on
# before triton is first imported anywhere, hence here, at collection time.
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
# one thread per pytest-xdist worker (make test runs two), both threads when run alone
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
