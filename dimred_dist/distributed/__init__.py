"""Everything that knows how parameters are distributed; the only package that may import DeepSpeed."""
