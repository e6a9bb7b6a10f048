"""Low-rank gradient projection (GaLore, Q-GaLore, SVD-free DCT): optimizers and projector math."""
