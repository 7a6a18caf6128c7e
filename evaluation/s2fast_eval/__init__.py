"""s2fast's evaluation tools, kept out of the installed package: what a user of the sampler never imports.

    digits/    training of the embedded digits model and its judge (train, classifier, data), the guidance
               frontiers per checkpoint and their report (frontier, frontier_report), the first method grid
               (evaluate), AutoGuidance on the digits pipeline (autoguidance)
    quality/   the toy mixtures with closed-form truth, the toy denoiser and its study (toys, toy_model, toy_eval),
               the premise test with exact scores (toy_alignment), metrics and Pillow plots
    rerun      every command behind the quality claims, two at a time, timed, and checked against the committed
               results

Run from the repository root with this folder on the path, e.g.
``PYTHONPATH=evaluation .venv/bin/python -m s2fast_eval.digits.frontier --help`` (benchmarks/quality/README.md
has every command). The tests put it on the path themselves (pyproject.toml, pytest's pythonpath).
"""
