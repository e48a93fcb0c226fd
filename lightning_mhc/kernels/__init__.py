"""mHC compute steps: the torch reference (ground truth) and, later, fused kernels behind one dispatch."""
