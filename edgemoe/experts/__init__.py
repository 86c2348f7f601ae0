"""Where each routed expert's weights are and how they reach the kernels."""
