"""The cost demo (SD3-shaped, random weights) runs end to end (at a reduced size) and reports what it promises."""

import pytest

from s2fast import cost_demo as demo


def test_demo_runs_and_reports(capsys):
    demo.main(["--steps", "3", "--layers", "4", "--heads", "2", "--head-dim", "8", "--latent", "8", "--tokens", "5",
               "--rounds", "2"])
    out = capsys.readouterr().out
    for method in ("stock CFG", "naive three-pass S²", "s2fast S²"):
        assert method in out
    assert "largest |s2fast S² − naive S²|" in out
    diff = float(out.split("over the final latents: ")[1].split()[0])
    assert diff < 1e-4  # the same masks through both S² implementations: rounding only
    assert "untrustworthy: 2 rounds only" in out  # two rounds show no spread worth the name


@pytest.mark.parametrize("argv, words", [(["--steps", "1"], "--steps"), (["--latent", "7"], "--latent"),
                                          (["--layers", "0"], "--layers"),
                                          (["--rounds", "0"], "--rounds"), (["--omega", "-1"], "omega must be >= 0"),
                                          (["--guidance", "1"], "--guidance")])
def test_demo_rejects_bad_options(argv, words, capsys):
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert words in capsys.readouterr().err
