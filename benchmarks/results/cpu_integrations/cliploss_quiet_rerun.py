import os, sys
sys.path.insert(0, os.getcwd())
from fastcl.bench.harness import _run_worker
from fastcl.bench.suites import integrations as g
cs=[c for c in g.cases("cpu", False) if c.params["loss"] in ("open_clip.ClipLoss",) and c.params["batch"]==8192]
for rep in range(2):
    for c in cs:
        r=_run_worker(c,"cpu",600); print(rep, c.provider, r.time_ms, r.peak_mb, r.status, flush=True)
