"""The ops floor: what every op in ``fastcl/ops`` builds on (no op imports another op's internals).

- :mod:`.backends`: backend resolution, each op passing its own table of GPU backends;
- :mod:`.checks`: argument checks, dtype rules, ``BACKENDS`` / ``REDUCTIONS``;
- :mod:`.gradients`: compute dtype, the custom ops' fused-gradient hand-over, double-backward references;
- :mod:`.blocks`: row blocks of similarities and their sizing;
- :mod:`.gpu`: Triton availability and device checks;
- :mod:`.triton_runtime`: tile selection and launch helpers of every Triton kernel (imports triton:
  loaded only when a Triton backend runs).
"""
