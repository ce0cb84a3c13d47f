"""SMT: Sparse Matrix Tuning (He et al., ICLR 2025)."""
