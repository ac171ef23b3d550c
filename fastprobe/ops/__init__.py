"""One module per operation family: validation, torch.library registration
(CPU / CUDA kernels, fake implementation, autograd where there is a gradient)
and the result type."""
