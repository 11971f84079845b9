"""``python -m torchtool`` (also what ``torchrun -m torchtool`` runs)."""

from torchtool.cli import main

if __name__ == "__main__":
    main()
