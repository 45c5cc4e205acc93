"""Thin integrations: DeepSpeed, the HF Trainer, accelerate, W&B. Each only calls the manager."""
