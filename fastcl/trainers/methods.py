"""The method registry: name -> module. A method module defines ``Config`` (a TrainConfig),
``build(config) -> Method``, ``DEFAULT_STEPS`` and, for the benchmark, ``bench_runs(full)``.
Adding a method is one line here (see docs/trainers.md, "Adding a method")."""

METHODS = {
    "simcse": "fastcl.trainers.simcse",
    "dpr": "fastcl.trainers.dpr",
    "nv_embed": "fastcl.trainers.nv_embed",
    "simclr": "fastcl.trainers.simclr",
    "clip": "fastcl.trainers.clip",
    "ps3": "fastcl.trainers.ps3",
    "cml": "fastcl.trainers.cml",
    "ccn": "fastcl.trainers.ccn",
}
