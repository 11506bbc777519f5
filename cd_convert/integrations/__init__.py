"""Optional integrations with model libraries (imported lazily; their packages are optional extras)."""

__all__ = ["timm", "transformers"]
