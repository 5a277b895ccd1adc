"""dopr-robot: diffusion / flow-matching action-chunking policies, three optimizers, closed-loop evaluation."""

__version__ = "0.1.0"
