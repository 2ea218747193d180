"""Manifests -> model: timm models, losses, augmentation, schedules, loader, the loop."""
