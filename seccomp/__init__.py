"""lazyshim."""
