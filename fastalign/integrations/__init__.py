"""fastalign inside the training people already run: transformers models (``patch_model``)."""

from fastalign.integrations.transformers import is_patched, patch_model, unpatch_model

__all__ = ["is_patched", "patch_model", "unpatch_model"]
