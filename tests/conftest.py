# Tests run on CPU. The Triton kernel runs through Triton's interpreter, which must be switched on
# before triton is first imported anywhere, hence here, at collection time.
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
