"""Rules kept for study, not the product: imported only when named (see README.md here)."""
