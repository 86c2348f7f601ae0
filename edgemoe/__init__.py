"""edgemoe: Mixture-of-Experts inference on the CPU, experts streamed from the SSD."""

__version__ = "0.1.0"
