"""featup.backbones: one contract for every vision backbone FeatUp upsamples."""
