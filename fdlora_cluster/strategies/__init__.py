"""Federated strategies: pure objects over `dict[str, Tensor]` (no MPI, no DeepSpeed)."""

from .aggregate import (InOrderSum, OuterOptimizer, UpdateError, check_update, client_weights, l2_distance, pseudo_gradient,
                        weighted_average)
from .methods import (STRATEGIES, DiLoCo, Ditto, FDLoRA, FedAvg, FedDPA, FedProx, Local, PersonalTraining, Strategy,
                      make_strategy)

__all__ = ["STRATEGIES", "DiLoCo", "Ditto", "FDLoRA", "FedAvg", "FedDPA", "FedProx", "InOrderSum", "Local", "OuterOptimizer",
           "PersonalTraining", "Strategy",
           "UpdateError", "check_update", "client_weights", "l2_distance", "make_strategy", "pseudo_gradient", "weighted_average"]
