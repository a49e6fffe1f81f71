"""The model: plain PyTorch, no torch.distributed. See transformer.py for module names."""

from moe.model.loss import lm_loss
from moe.model.moe import MoE
from moe.model.router import RoutingStats, expert_capacity, plan_capacity
from moe.model.transformer import Block, Transformer, build_model

__all__ = ["lm_loss", "MoE", "RoutingStats", "expert_capacity", "plan_capacity", "Block",
           "Transformer", "build_model"]
