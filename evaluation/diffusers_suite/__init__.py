"""diffusers' own pipeline tests with s2fast wrapped in (README.md)."""
