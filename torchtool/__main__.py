"""``python -m torchtool`` (also what ``torchrun -m torchtool`` runs)."""

from torchtool.cli import entry

if __name__ == "__main__":
    entry()
