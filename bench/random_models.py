"""Randomly initialised models with production-sized architectures, for throughput benchmarks.

A random ViT-Base/16 costs exactly what a trained one costs per image, so it measures batching gains of
the ``classify`` path without downloading weights. Its labels are meaningless; never use it for quality.
"""

from __future__ import annotations

from pathlib import Path


def random_vit_base(directory: Path) -> Path:
    """Save a random ViT-Base/16 (224 px, 1000 labels, ~86M parameters) and its processor; return the path."""
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_vit import ViTImageProcessor

    path = directory / "random-vit-base-patch16-224"
    if (path / "config.json").exists():
        return path
    config = ViTConfig(image_size=224, patch_size=16, num_labels=1000)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(path)
    return path
