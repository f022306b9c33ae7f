"""Tools beside the library: a pod on one machine (``local_pod``) and the rehearsal of a
full-scale config on it (``rehearsal``: the plan and its data; ``rehearse``: the run).

The library never imports this package; these modules import the library (the layering of
big_vision, whose ``tools/`` sits beside its trainers). Nothing is imported here, so that
``python -m contrastive_jax.tools.local_pod`` needs only the standard library.
"""
