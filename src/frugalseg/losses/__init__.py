"""Pure loss functions, one module per family."""
