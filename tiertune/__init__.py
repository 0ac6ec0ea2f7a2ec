"""tiertune: plan, simulate and run LLM fine-tuning across GPU, CPU and NVMe tiers."""

__version__ = "0.1.0"
