"""FX graph passes over the traced model and the pass manager that runs them."""
