"""Experiments: train every method, evaluate, write tables (LM-O, hands, NYU)."""
