"""fdlora-cluster: personalized federated fine-tuning with dual LoRA, each client a DeepSpeed cluster."""

__version__ = "0.1.0"
