"""``python -m s2fast`` is the ``s2fast`` command (``accelerate launch -m s2fast ...``, ``torchrun -m s2fast ...``)."""

from s2fast.cli import main

if __name__ == "__main__":
    main()
