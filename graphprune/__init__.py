"""graphprune: training-free token pruning for diffusion models, as a torch.compile pass."""
