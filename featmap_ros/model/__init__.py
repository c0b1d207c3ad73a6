"""Networks (f feature extractor, g mapping, h pose head), losses and self-describing checkpoints."""
