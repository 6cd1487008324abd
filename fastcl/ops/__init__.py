"""fastcl ops: one folder per op on a shared floor (``common``).

Every op folder has the same files for the same roles: ``__init__`` (the public function and its
module), ``naive`` (the reference), ``options`` (its backends and argument checks), ``chunked``
(pure PyTorch, row blocks), ``native`` (C++ kernel glue), ``triton`` (GPU kernels), ``op`` (the
custom op); a backend an op lacks is an absent file. ``common`` holds what they share (backend
resolution, checks, dtype rules, blocks, gradient helpers, the Triton runtime); no op imports
another op's internals. See docs/adding_an_op.md.
"""
