"""Per-call time (forward + backward, median) of a small and a large call of each CPU op, from the
fastcl source tree on PYTHONPATH (not an editable install's): run it once per tree, alternating,
to compare two commits in the same session, e.g.

    for r in 1 2 3; do for t in /tmp/fastcl-a /tmp/fastcl-b; do
        PYTHONPATH=$t python benchmarks/bench_tree_calls.py >> calls.jsonl; done; done

Both trees need the same native libraries (fastcl/_kernels_*.so copied in). Prints one JSON
line: {"tree": ..., case: milliseconds}.
"""
import json, sys, time
sys.meta_path[:] = [f for f in sys.meta_path if 'Redirecting' not in type(f).__name__]
import torch, torch.nn.functional as F
import fastcl
torch.manual_seed(0)
def unit(*s): return F.normalize(torch.randn(*s), dim=-1)
out = {}
cases = {}
for B in (64, 2048):
    q, k = unit(B, 128).requires_grad_(), unit(B, 128).requires_grad_()
    cases[f"info_nce B={B}"] = lambda q=q, k=k: fastcl.info_nce(q, k, temperature=0.05)
    cases[f"clip B={B}"] = lambda q=q, k=k: fastcl.clip_loss(q, k, 20.0)
    cases[f"siglip B={B}"] = lambda q=q, k=k: fastcl.siglip_loss(q, k, 10.0, -10.0)
    w = unit(B, 16, 128).requires_grad_()
    cases[f"cml B={B}"] = lambda q=q, k=k, w=w: fastcl.cml_loss(q, k, w, num_items=1000)
    pages = unit(max(2, B // 16), 16, 128).requires_grad_()
    clicks = torch.randint(0, 2, pages.shape[:2])
    cases[f"collaborative P={pages.shape[0]}"] = lambda p=pages, c=clicks: fastcl.collaborative_contrastive_loss(p, c)
for name, fn in cases.items():
    for _ in range(3): fn().backward()
    n = 30 if "2048" not in name else 5
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn().backward(); times.append(time.perf_counter() - t)
    times.sort(); out[name] = times[len(times) // 2] * 1e3
print(json.dumps({"tree": fastcl.__file__.rsplit("/fastcl/", 1)[0], **out}))
