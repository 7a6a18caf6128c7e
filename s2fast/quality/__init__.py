"""What S² does to samples, measured on models the project trains itself.

toys.py: the paper's class-conditional mixtures with closed-form truth; metrics.py: distances to that truth;
toy_model.py: a residual-MLP flow-matching denoiser that runs through s2fast's engine as one more adapter.
"""
