"""Shared code of the FinQA RL pipeline: one module per concern."""
