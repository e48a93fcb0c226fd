"""lightning_mhc: Manifold-Constrained Hyper-Connections (mHC) for any PyTorch / Lightning model."""

from lightning_mhc.config import MHCConfig
from lightning_mhc.hyper_connection import HyperConnection
from lightning_mhc.streams import StreamReadout, expand_streams

__all__ = ["HyperConnection", "MHCConfig", "StreamReadout", "expand_streams"]
__version__ = "0.1.0"
