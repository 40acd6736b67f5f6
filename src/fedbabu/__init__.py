"""fedbabu: FedBABU and honest baselines for personalized federated learning."""

__version__ = "0.1.0"
