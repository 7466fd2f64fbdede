"""Datasets, transforms and loaders. Samples are uint8; normalisation happens on the device."""
