"""Dataset readers: BOP (objects) and NYU (hands)."""
