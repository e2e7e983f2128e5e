"""The jobs built on training: evaluation, batch inference, the pipeline, sweeps, updates from the
live log, and the streaming replay."""
