"""`python -m chat ...` = the `llama-mpi` console script."""
import sys

from .cli import main

sys.exit(main())
