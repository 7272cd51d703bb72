"""Tiers: route kept samples to training-stage tiers and write WebDataset shards."""
