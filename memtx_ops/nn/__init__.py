"""Drop-in ``nn.Module``s over the fused ops."""
