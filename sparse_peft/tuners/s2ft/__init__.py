"""S²FT: Structured Sparse Fine-Tuning (Yang et al., NeurIPS 2024)."""
