"""Run model-written Python against its tests on this machine, safely: the code reward's engine.

    with Sandbox() as box:
        [v] = box.run([Job(program, tests=["assert f(2) == 4"], imports=["import math"])])
        v.fraction  # share of the tests passed
        [r] = box.run_cells([Cell("print(x * 2)", history=["x = 21"])])
        r.output  # "42\n": a tool call, with the rollout's earlier cells replayed first

Three files, each readable in one sitting: `pool.py` (fork servers, one per core, fed in
parallel), `server.py` (fork per execution, OS limits, uid, network namespace) and `harness.py`
(runs the program and its asserts, writes a nonce-signed verdict, audit hook).
"""

from posttrain.sandbox.pool import Cell, CellResult, Job, Sandbox, Verdict, release_shared, shared

__all__ = ["Cell", "CellResult", "Job", "Sandbox", "Verdict", "shared", "release_shared"]
