"""Parallel wrappers applied to any nn.Module from outside."""

from parallel.ddp import DataParallel

__all__ = ["DataParallel"]
