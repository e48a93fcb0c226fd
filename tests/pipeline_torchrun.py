"""Several pipeline trainings in one process group, as launched by ``torchrun``.

``python -m torch.distributed.run --nproc_per_node N tests/pipeline_torchrun.py OUT RUNS`` where ``RUNS`` is JSON
``{tag: {"strategy": MHCPipelineStrategy kwargs, "fit": test_pipeline.fit kwargs}}``; each run writes its records
under its tag (see ``test_pipeline.Record``), with a distributed sampler over the data-parallel replicas.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_pipeline import fit  # noqa: E402

from lightning_mhc import MHCPipelineStrategy  # noqa: E402


def main() -> None:
    out, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    for tag, run in runs.items():
        strategy = MHCPipelineStrategy(**run["strategy"])
        fit(out, strategy, int(os.environ["WORLD_SIZE"]), tag=tag, distributed_sampler=True, **run["fit"])


if __name__ == "__main__":
    main()
