"""A job's frame: the typed config schema, config -> objects, the run folder, the Hydra entry
point, and the Ray session (embedded or a cluster) the config names."""
