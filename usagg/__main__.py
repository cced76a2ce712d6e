"""``python -m usagg`` runs the CLI, which is how ``torchrun -m usagg train ...`` starts each rank."""

from usagg.cli import main

main()
