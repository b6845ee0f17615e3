"""featup.kernels: the fused adaptive convolution (CPU and CUDA) behind FeatUp's JBU upsampler."""

# TEMPORARY bootstrap so the other packages can be developed before the compiled op lands;
# replaced by the compiled-op front end.
from featup.kernels._reference import adaptive_conv_reference

adaptive_conv = adaptive_conv_reference

__all__ = ["adaptive_conv", "adaptive_conv_reference"]
