"""Data: manifest and splits, decoding, preprocessing, the decoded-image cache, synthetic data."""
