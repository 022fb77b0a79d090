"""Graph passes. ``linearize`` rewrites attention sites into Liger attention; ``lora`` injects LoRA adapters."""
