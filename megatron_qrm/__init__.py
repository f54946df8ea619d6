"""megatron-qrm: token-level Q-function reward models (Q-RM) and RL on Megatron-Core."""

__version__ = "0.1.0"
