"""Launching a training stage in this process or on Ray Train (DDP, DeepSpeed), its callbacks,
reading checkpoints back, and writing the model bundle. ``deepspeed_json`` and ``cpu_deepspeed``
import neither Ray nor Hydra (bench/train_throughput.py runs them on a bare GPU image)."""
