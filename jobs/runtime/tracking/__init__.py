"""What a job shows and records: the console, Weights & Biases results, reading offline wandb runs
back, and the HTML report."""
