"""Drop-in adapters: loss classes with the constructor arguments, defaults and values of the classes
people already train with, running on segkd_kernels' ops (docs/api.md, docs/conventions.md).

    from segkd_kernels.compat.cirkd import CriterionKD, CriterionCWD   # instead of CIRKD's losses
    from segkd_kernels.compat.mmrazor import ChannelWiseDivergence
    from segkd_kernels.compat.attnfd import AttnFDLoss, build_feature_connector

Each class also takes `backend` (keyword-only, default "auto") like every segkd_kernels function.
Unlike the originals, no gradient reaches the teacher's inputs.
"""

from . import attnfd, cirkd, mmrazor

__all__ = ["cirkd", "mmrazor", "attnfd"]
