"""
Plumbing the stage scripts share (a stage never imports another stage): atomic JSON writes, Wilson intervals,
mean and spread over seeds.

Reads, writes: nothing by itself. Imported by attack.py, study.py and report.py.
"""
import json
import math
import os


def write_json(path, obj, indent=None):
    """Write JSON to a temporary file, then rename it over `path`: a crash never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".tmp", path)


def load_json(path):
    """The JSON at path, or None when there is no file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def wilson(k, n, z=1.96):
    """k of n with its 95% Wilson score interval (good at small n and at rates near 0 or 1)."""
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "lo": None, "hi": None}
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {"k": k, "n": n, "rate": p, "lo": max(0.0, center - half), "hi": min(1.0, center + half)}


def mean_spread(values):
    """Mean and spread (sample standard deviation; 0 for one value) of the values that exist."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)
