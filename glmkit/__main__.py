"""`python -m glmkit <command>` (and `torchrun -m glmkit pretrain ...`)."""
import sys

from .cli import main

sys.exit(main())
