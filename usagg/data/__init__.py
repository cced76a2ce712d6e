"""Data layer: source readers, decoding, joint transforms, splits, fractions and multi-task sampling."""
