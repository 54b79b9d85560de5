"""Pretrained weights by name: the registry of published MobileNetV2 weights, downloads into a cache, the Hugging
Face Hub."""
