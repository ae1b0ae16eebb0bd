"""The first name of ``python -m trainer.release``, kept so that commands already written
down (``python -m trainer.reference import RUN``) still run; it is the same command."""
import sys

from .release import main

if __name__ == "__main__":
    sys.exit(main())
