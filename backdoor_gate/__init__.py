"""The ``backdoor-gate`` command: the top layer, which may import every other package.

Layers, each importing only those before it (``tests/lab/test_layering.py`` checks every import):
``detector`` (the library) → ``components`` (trainer, gate, registry) → ``pipelines`` (KFP
wiring, demo) → ``lab`` (paper protocol, benchmark, synthetic families) → ``backdoor_gate``.
"""
