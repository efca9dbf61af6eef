"""The arena process: one stack's weights and KV pool in shared memory (see main.py)."""
