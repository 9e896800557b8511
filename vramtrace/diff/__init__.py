"""Compare runs by meaning (owner x module x phase at comparable points) and merge ranks."""
