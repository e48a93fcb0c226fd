"""lightning_mhc: Manifold-Constrained Hyper-Connections (mHC) for any PyTorch / Lightning model."""

from lightning_mhc.callback import MHCCallback
from lightning_mhc.checkpoint import load_from_checkpoint
from lightning_mhc.config import MHCConfig
from lightning_mhc.hyper_connection import HyperConnection
from lightning_mhc.inject import InjectionReport, apply_mhc
from lightning_mhc.strategies import MHCPipelineStrategy
from lightning_mhc.streams import StreamReadout, expand_streams

__all__ = [
    "HyperConnection",
    "InjectionReport",
    "MHCCallback",
    "MHCConfig",
    "MHCPipelineStrategy",
    "StreamReadout",
    "apply_mhc",
    "expand_streams",
    "load_from_checkpoint",
]
__version__ = "0.1.0"
