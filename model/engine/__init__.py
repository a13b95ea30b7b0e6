"""The inference engine: the cascade network, patch-wise inference, post-processing, the
anatomy check and the verdict on a segmentation, and the weights they load."""
