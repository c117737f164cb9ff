"""A stand-in device actor for the broadcast benchmark: it receives the broadcast and reads each of its arrays.

Ray imports an actor's class by module name in its worker processes, which do not see the `sys.path` the driver
was given at run time (pytest's `pythonpath`, say); so this module is pickled by value instead.
"""

from __future__ import annotations

import sys

import numpy as np
import ray.cloudpickle

from dccl_sim.algorithms.protocol import Broadcast


class Receiver:
    def touch(self, broadcast: Broadcast | None) -> int:
        """Read every array of the broadcast once; returns the bytes read (0 for no broadcast: an empty call)."""
        if broadcast is None:
            return 0
        arrays = [*broadcast.model_state.values(), *(broadcast.patch_state or {}).values(), broadcast.participants]
        if isinstance(broadcast.payload, np.ndarray):  # dccl's payload: the participants' starting meta-patches
            arrays.append(broadcast.payload)
        for array in arrays:
            np.add.reduce(array, axis=None)
        return sum(array.nbytes for array in arrays)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
