"""The textbook softmax of the explicit-loop fp64 oracles (test_channel_wise_kd.py, test_pixel_kd.py):
Python floats, math.exp / math.log, no torch."""

import math


def softmax_and_log(values, tau):
    """(p, log p) of softmax(values / tau), shifted by the max so exp never overflows."""
    scaled = [v / tau for v in values]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    z = sum(exps)
    return [e / z for e in exps], [v - top - math.log(z) for v in scaled]
