"""The built-in strategies, one file each; `dccl_sim.plugins` finds them by their `name`."""
