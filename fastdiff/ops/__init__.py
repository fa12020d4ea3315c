"""Fused ops. Each module holds validation, the torch.library custom op, dispatch, and the eager
torch reference beside it."""
