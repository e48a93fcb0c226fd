"""Lightning strategies for mHC models: :class:`MHCPipelineStrategy` (pipeline parallel on
``torch.distributed.pipelining``), registered in Lightning's strategy registry as ``mhc_pipeline`` (1F1B) and
``mhc_dualpipev`` (DualPipeV)."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_mhc.strategies.pipeline import MHCPipelineStrategy, available_schedules
from lightning_mhc.strategies.stages import StageModule, balanced_split


def _register() -> None:
    for name, schedule in (("mhc_pipeline", "1F1B"), ("mhc_dualpipev", "DualPipeV")):
        if name not in StrategyRegistry:
            StrategyRegistry.register(
                name,
                MHCPipelineStrategy,
                description=f"mHC pipeline parallel ({schedule}) over all devices",
                schedule=schedule,
            )


_register()

__all__ = ["MHCPipelineStrategy", "StageModule", "available_schedules", "balanced_split"]
