"""The toy study: mixtures with closed-form truth, a small denoiser, metrics and plots."""
