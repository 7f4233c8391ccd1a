"""Federated strategies: pure objects over `dict[str, Tensor]` (no MPI, no DeepSpeed)."""

from .aggregate import (InOrderSum, OuterOptimizer, UpdateError, check_update, client_weights,
                        weighted_average)
from .plan import Copy, Evaluate, Fuse, JoinFederation, SendUpdate, Step, Train
from .methods import (STRATEGIES, DiLoCo, Ditto, FDLoRA, FedAvg, FedDPA, FedProx, Local, Strategy,
                      make_strategy)

__all__ = ["Copy", "Evaluate", "Fuse", "JoinFederation", "SendUpdate", "Step", "Train", "STRATEGIES", "DiLoCo", "Ditto", "FDLoRA", "FedAvg", "FedDPA", "FedProx", "InOrderSum", "Local", "OuterOptimizer",
           "Strategy",
           "UpdateError", "check_update", "client_weights", "make_strategy", "weighted_average"]
