"""Files -> manifests: folder walk, integrity, splits, sampling weights."""
